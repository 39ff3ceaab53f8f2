package state

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// Port marks (bpf/aegis.c, "Port marks"): port_marks says which
// destination ports the data path may find a session or a flow at, so that
// it skips the lookups of the others. A mark is never cleared while the map
// lives, and each writer writes 1 into its own slot, so writers need no
// lock. The marks of a kind count only once they are trusted:
//
//   - sessions: every session this package writes is marked first (guarded
//     and InsertNew), and TrustSessionMarks, which the control plane calls
//     on every refresh, marks what the maps already hold and then trusts;
//   - flows: the data path marks the flows it creates, and the loader calls
//     TrustFlowMarks once this build's egress program runs everywhere.
//
// The loader distrusts both (DistrustMarks) before it swaps programs.

// Mark slots, from the object's BTF.
const (
	markTCP             = uint32(bpf.AegisMarkSlotMARK_TCP)
	markUDP             = uint32(bpf.AegisMarkSlotMARK_UDP)
	markAny             = uint32(bpf.AegisMarkSlotMARK_ANY)
	markFlow            = uint32(bpf.AegisMarkSlotMARK_FLOW)
	marksSessionTrusted = uint32(bpf.AegisMarkSlotMARKS_SESSIONS_TRUSTED)
	marksFlowTrusted    = uint32(bpf.AegisMarkSlotMARKS_FLOWS_TRUSTED)
	markSlots           = uint32(bpf.AegisMarkSlotMARK_SLOTS)
)

// sessionMark is the slot marking sessions of proto at port.
func sessionMark(proto Protocol, port uint16) uint32 {
	switch proto {
	case TCP:
		return markTCP + uint32(port)
	case UDP:
		return markUDP + uint32(port)
	}
	return markAny + uint32(port)
}

// markCache remembers the slots this process has seen set in one
// port_marks map, so that a grant to a marked port costs no system call.
// Valid for the map it was filled from: a Maps holds one per map it opens.
type markCache struct {
	set [(markSlots + 63) / 64]atomic.Uint64
}

func (c *markCache) has(slot uint32) bool {
	return c.set[slot/64].Load()&(1<<(slot%64)) != 0
}

func (c *markCache) reset() {
	for i := range c.set {
		c.set[i].Store(0)
	}
}

// mark writes 1 into slot unless the cache says it holds 1.
func (c *markCache) mark(mp *ebpf.Map, slot uint32) error {
	if c.has(slot) {
		return nil
	}
	if err := mp.Put(slot, uint32(1)); err != nil {
		return fmt.Errorf("mark port in %s: %w", MapPortMarks, err)
	}
	c.set[slot/64].Or(1 << (slot % 64))
	return nil
}

// markSession marks k's port before k's session is written. A set without
// the map (a test's, or pins from before it) marks nothing.
func (m *Maps) markSession(k Key) error {
	if m.PortMarks == nil {
		return nil
	}
	return m.marks.mark(m.PortMarks, sessionMark(k.Proto, k.Port))
}

// MarksTrusted reports whether the data path trusts the session and the
// flow marks.
func MarksTrusted(marks *ebpf.Map) (sessions, flows bool, err error) {
	var s, f uint32
	if err := errors.Join(marks.Lookup(marksSessionTrusted, &s), marks.Lookup(marksFlowTrusted, &f)); err != nil {
		return false, false, fmt.Errorf("read %s: %w", MapPortMarks, err)
	}
	return s != 0, f != 0, nil
}

// TrustSessionMarks makes the data path trust the session marks, unless it
// does already: it marks the port of every session the maps hold, then
// sets the trust. Sessions written meanwhile by this package are marked by
// their writers. It reports whether it set the trust. The caller must be
// the only writer of sessions that does not mark, that is, no build from
// before port_marks may write the maps; the loader's DistrustMarks on
// every load takes care of an upgrade's overlap.
func (m *Maps) TrustSessionMarks() (bool, error) {
	if m.PortMarks == nil {
		return false, nil
	}
	if sessions, _, err := MarksTrusted(m.PortMarks); err != nil || sessions {
		return false, err
	}
	var werr error
	mark := func(proto uint8, port uint16) bool {
		werr = m.marks.mark(m.PortMarks, sessionMark(Protocol(proto), port))
		return werr == nil
	}
	err := errors.Join(
		m.EachV4(func(k *bpf.AegisSessionKeyV4, _ *bpf.AegisSessionValue) bool { return mark(k.Proto, k.Dport) }),
		m.EachV6(func(k *bpf.AegisSessionKeyV6, _ *bpf.AegisSessionValue) bool { return mark(k.Proto, k.Dport) }))
	if err = errors.Join(err, werr); err != nil {
		return false, err
	}
	if err := m.PortMarks.Put(marksSessionTrusted, uint32(1)); err != nil {
		return false, fmt.Errorf("trust session marks: %w", err)
	}
	return true, nil
}

// TrustFlowMarks marks the reply port of every flow in flowsV4 and
// flowsV6, then makes the data path trust the flow marks. The loader calls
// it once this build's egress program, which marks the flows it creates,
// runs on every interface, so the flows a build from before port_marks
// created are the ones it marks.
func TrustFlowMarks(marks, flowsV4, flowsV6 *ebpf.Map) error {
	var c markCache
	err := errors.Join(
		markFlows(&c, marks, flowsV4, func(k *bpf.AegisFlowKeyV4) uint16 { return k.Dport }),
		markFlows(&c, marks, flowsV6, func(k *bpf.AegisFlowKeyV6) uint16 { return k.Dport }))
	if err != nil {
		return fmt.Errorf("mark flows: %w", err)
	}
	if err := marks.Put(marksFlowTrusted, uint32(1)); err != nil {
		return fmt.Errorf("trust flow marks: %w", err)
	}
	return nil
}

// markFlows marks the reply port of every flow in flows. The data path
// adds and evicts flows meanwhile: those it adds it marks itself.
func markFlows[K any](c *markCache, marks, flows *ebpf.Map, port func(*K) uint16) error {
	var k K
	var v bpf.AegisFlowValue
	it := flows.Iterate()
	for it.Next(&k, &v) {
		if err := c.mark(marks, markFlow+uint32(port(&k))); err != nil {
			return err
		}
	}
	return it.Err()
}

// DistrustMarks makes the data path make every lookup again, until the
// marks are trusted anew.
func DistrustMarks(marks *ebpf.Map) error {
	if err := errors.Join(marks.Put(marksSessionTrusted, uint32(0)), marks.Put(marksFlowTrusted, uint32(0))); err != nil {
		return fmt.Errorf("distrust %s: %w", MapPortMarks, err)
	}
	return nil
}
