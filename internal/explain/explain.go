// Package explain says what the data path would do with one packet and
// why, without sending it: the Go model of the program (bpf/model.go) runs
// on a snapshot of exactly the live map entries the program would look up
// for that packet (the config, the session of the exact protocol and of
// protocol 0, the flow, the allow rules of the longest matching prefix).
// The lookups are plain reads: no counter moves and no last_seen is
// refreshed, which running the real program (BPF_PROG_TEST_RUN) would do.
// The one question the maps cannot answer, whether a destination is local
// to the gateway (the controller's gRPC bypass), is asked of the kernel by
// the data path's own code, which touches no map (locality.go).
package explain

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Flow is the packet to explain: TCP or UDP from Src:Sport to Dst:Port.
type Flow struct {
	Src, Dst netip.Addr
	Sport    uint16 // 0 for DefaultSourcePort
	Port     uint16
	Proto    uint8 // 6 or 17; 0 for TCP
}

// DefaultSourcePort is the source port of a Flow that names none: an
// ephemeral port, as a client's would be.
const DefaultSourcePort = 40000

// ErrInvalidFlow is returned for a flow that cannot be synthesized.
var ErrInvalidFlow = errors.New("invalid flow")

func (f *Flow) normalize() error {
	f.Src, f.Dst = f.Src.Unmap(), f.Dst.Unmap()
	if !f.Src.IsValid() || !f.Dst.IsValid() || f.Src.Is4() != f.Dst.Is4() {
		return fmt.Errorf("%w: source and destination must be addresses of one family", ErrInvalidFlow)
	}
	if f.Proto == 0 {
		f.Proto = 6
	}
	if f.Proto != 6 && f.Proto != 17 {
		return fmt.Errorf("%w: protocol %d: tcp or udp", ErrInvalidFlow, f.Proto)
	}
	if f.Port == 0 {
		return fmt.Errorf("%w: destination port 0", ErrInvalidFlow)
	}
	if f.Sport == 0 {
		f.Sport = DefaultSourcePort
	}
	return nil
}

// Frame synthesizes the flow's first packet as the XDP program sees it:
// Ethernet, IPv4 or IPv6, a TCP SYN or an empty UDP datagram.
func (f Flow) Frame() ([]byte, error) {
	if err := f.normalize(); err != nil {
		return nil, err
	}
	l4len := 8
	if f.Proto == 6 {
		l4len = 20
	}
	b := make([]byte, 12, 14+40+l4len)
	if f.Src.Is4() {
		b = binary.BigEndian.AppendUint16(b, 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+l4len))
		ip[8], ip[9] = 64, f.Proto
		copy(ip[12:], f.Src.AsSlice())
		copy(ip[16:], f.Dst.AsSlice())
		b = append(b, ip...)
	} else {
		b = binary.BigEndian.AppendUint16(b, 0x86DD)
		ip := make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(l4len))
		ip[6], ip[7] = f.Proto, 64
		copy(ip[8:], f.Src.AsSlice())
		copy(ip[24:], f.Dst.AsSlice())
		b = append(b, ip...)
	}
	l4 := make([]byte, l4len)
	binary.BigEndian.PutUint16(l4[0:], f.Sport)
	binary.BigEndian.PutUint16(l4[2:], f.Port)
	if f.Proto == 6 {
		l4[12], l4[13] = 5<<4, 0x02 // data offset 5, SYN
	} else {
		binary.BigEndian.PutUint16(l4[4:], 8)
	}
	return append(b, l4...), nil
}

// Result is the explanation.
type Result struct {
	Flow Flow
	// Action and Reason are what the data path gives the packet; Cause is
	// the verdict's own reason (Reason is monitor for a would-be drop).
	Action bpf.Action
	Reason bpf.Reason
	Cause  bpf.Reason
	// Session is the session that passes it, or the expired one that makes
	// it expired; SessionProto is that session's protocol (0: any).
	Session      *state.Session
	SessionProto uint8
	// IdleLeft and LifetimeLeft are the session's; LifetimeLeft is 0 for
	// no lifetime cap.
	IdleLeft, LifetimeLeft time.Duration
	// Flow is the reply flow that passes it.
	ReplyFlow *bpf.AegisFlowValue
	// AllowRules are the (protocol, port) rules that apply to the source:
	// those of its longest matching prefix, which include the rules of
	// every shorter prefix covering it.
	AllowRules []bpf.AegisAllowPort
	// AllowRule is the one of them the data path counts the packet
	// against (its Rule is the rule's id), when an allow rule admits it.
	AllowRule *bpf.AegisAllowPort
}

// skipAnyProtocol, set only by tests (export_test.go), leaves the
// any-protocol session out of the snapshot, to show that the comparison
// with the program notices.
var skipAnyProtocol bool

// Local answers whether the gateway delivers dst to itself (see
// bpf.Env.Local); nil for never.
type Local func(dst netip.Addr) bool

// Explain reads the entries the data path would look up for f and runs
// the model on them.
func Explain(m *state.Maps, f Flow, local Local) (*Result, error) {
	pkt, err := f.Frame()
	if err != nil {
		return nil, err
	}
	_ = f.normalize()
	now := state.Now()
	env := &bpf.Env{
		Now:        now,
		SessionsV4: map[bpf.AegisSessionKeyV4]*bpf.AegisSessionValue{},
		SessionsV6: map[bpf.AegisSessionKeyV6]*bpf.AegisSessionValue{},
		FlowsV4:    map[bpf.AegisFlowKeyV4]*bpf.AegisFlowValue{},
		FlowsV6:    map[bpf.AegisFlowKeyV6]*bpf.AegisFlowValue{},
		Frags:      map[bpf.AegisFragKey]*bpf.AegisFragValue{},
		Local:      local,
	}
	if err := m.Config.Lookup(uint32(0), &env.Config); err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	res := &Result{Flow: f}
	var sessions [2]*bpf.AegisSessionValue
	for i, proto := range []uint8{f.Proto, 0} {
		if i == 1 && skipAnyProtocol {
			break
		}
		v := new(bpf.AegisSessionValue)
		var err error
		if f.Src.Is4() {
			k := bpf.AegisSessionKeyV4{Src: f.Src.As4(), Dst: f.Dst.As4(), Dport: f.Port, Proto: proto}
			if err = m.SessionsV4.Lookup(&k, v); err == nil {
				env.SessionsV4[k] = v
			}
		} else {
			k := bpf.AegisSessionKeyV6{Src: f.Src.As16(), Dst: f.Dst.As16(), Dport: f.Port, Proto: proto}
			if err = m.SessionsV6.Lookup(&k, v); err == nil {
				env.SessionsV6[k] = v
			}
		}
		switch {
		case err == nil:
			c := *v
			sessions[i] = &c // the model may refresh its copy
		case !errors.Is(err, ebpf.ErrKeyNotExist):
			return nil, fmt.Errorf("read session: %w", err)
		}
	}
	fv := new(bpf.AegisFlowValue)
	var ferr error
	if f.Src.Is4() {
		k := bpf.AegisFlowKeyV4{Src: f.Src.As4(), Dst: f.Dst.As4(), Sport: f.Sport, Dport: f.Port, Proto: f.Proto}
		if ferr = m.FlowsV4.Lookup(&k, fv); ferr == nil {
			env.FlowsV4[k] = fv
		}
	} else {
		k := bpf.AegisFlowKeyV6{Src: f.Src.As16(), Dst: f.Dst.As16(), Sport: f.Sport, Dport: f.Port, Proto: f.Proto}
		if ferr = m.FlowsV6.Lookup(&k, fv); ferr == nil {
			env.FlowsV6[k] = fv
		}
	}
	if ferr != nil && !errors.Is(ferr, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read flow: %w", ferr)
	}
	if err := allowRules(m, f.Src, env, res); err != nil {
		return nil, err
	}

	action, reason := bpf.Verdict(pkt, env)
	res.Action, res.Reason, res.Cause = action, reason, reason
	if reason == bpf.ReasonMonitor && len(env.Events) > 0 {
		res.Cause = bpf.Reason(env.Events[0].Cause)
	} else if reason == bpf.ReasonMonitor {
		// Events off: ask the model again without monitor mode.
		env.Config.Monitor = 0
		_, res.Cause = bpf.Verdict(pkt, env)
	}
	if res.Cause == bpf.ReasonAllowlist {
		for slot := range env.AllowHits {
			for i := range res.AllowRules {
				if p := &res.AllowRules[i]; bpf.AllowHitSlot(familyOf(f.Src), p.Rule) == slot {
					res.AllowRule = p
				}
			}
		}
	}
	switch res.Cause {
	case bpf.ReasonSession, bpf.ReasonExpired:
		for i, v := range sessions {
			if v == nil {
				continue
			}
			// The live one that passes it, or the first that expired.
			if r, _ := bpf.SessionVerdict(v, env.Config.DefaultIdleTimeoutNs, now); r == bpf.ReasonSession || res.Cause == bpf.ReasonExpired {
				res.describeSession(f, v, []uint8{f.Proto, 0}[i], env.Config.DefaultIdleTimeoutNs, now)
				break
			}
		}
	case bpf.ReasonReply:
		res.ReplyFlow = fv
	}
	return res, nil
}

func (r *Result) describeSession(f Flow, v *bpf.AegisSessionValue, proto uint8, defIdle, now uint64) {
	s := state.SessionAt(state.Key{Src: f.Src, Dst: f.Dst, Port: f.Port, Proto: state.Protocol(proto)}, v)
	idle := v.IdleTimeoutNs
	if idle == 0 {
		idle = defIdle
	}
	r.Session, r.SessionProto = &s, proto
	r.IdleLeft = time.Duration(int64(v.LastSeenNs + idle - now))
	if v.ExpiresNs != 0 {
		r.LifetimeLeft = time.Duration(int64(v.ExpiresNs - now))
	}
}

func familyOf(a netip.Addr) uint8 {
	if a.Is4() {
		return 4
	}
	return 6
}

// allowRules reads the longest prefix matching src, as the program's LPM
// lookup does, and gives the model that entry as the entry of src alone:
// the loader stores in each prefix every rule of the shorter prefixes that
// cover it, so this one entry answers for all.
func allowRules(m *state.Maps, src netip.Addr, env *bpf.Env, res *Result) error {
	var v bpf.AegisAllowValue
	var err error
	if src.Is4() {
		k := bpf.AegisAllowKeyV4{Prefixlen: 32, Addr: src.As4()}
		if err = m.AllowV4.Lookup(&k, &v); err == nil {
			env.AllowV4 = map[bpf.AegisAllowKeyV4]bpf.AegisAllowValue{k: v}
		}
	} else {
		k := bpf.AegisAllowKeyV6{Prefixlen: 128, Addr: src.As16()}
		if err = m.AllowV6.Lookup(&k, &v); err == nil {
			env.AllowV6 = map[bpf.AegisAllowKeyV6]bpf.AegisAllowValue{k: v}
		}
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read allow rules: %w", err)
	}
	res.AllowRules = v.Ports[:min(int(v.Count), len(v.Ports))]
	return nil
}
