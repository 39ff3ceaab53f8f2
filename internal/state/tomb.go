package state

import (
	"context"
	"errors"
	"fmt"
	"iter"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the tombstones of removed sessions (tombs_v4/tombs_v6,
// "Tombstones" in bpf/aegis.c): while one is live, the egress program
// opens no flow for the session's reply tuple, so a service that keeps
// sending to a revoked or expired user gives that user no way back in as
// a "reply".
//
// Every path that removes a session writes its tombstone first and deletes
// the session after (Revoke, and the sweep's sections in sweep.go), so at
// every instant one of the two exists and no service packet finds neither.
//
// A full tombstone map fails closed: the session entry is kept instead,
// dead (Revoke writes revokedMark into its expires_ns; the sweep leaves an
// expired one where it is), and it refuses flows as a tombstone would; the
// data path passes nothing for it (expired). The sweep retries the move on
// every run, once stale tombstones have made room. What the operator sees:
// the revoked or expired sessions in listings until then, and the
// SweepResult's Kept count (the reaper's metrics).
//
// Tombstone writes race the sweep's deletes of stale tombstones exactly as
// session writes race its deletes of expired sessions, and take the same
// protocol (sweep.go): Revoke's write reads the sweep sequence before and
// after, and one that overlapped a section writes the tombstone again
// under the shared sweep lock. A sweep that deleted a revoke's fresh
// tombstone would otherwise leave the user's reply tuple open.
//
// A grant does not touch the tombstone of its key: the egress program
// consults a tombstone only when the key has no session entry, and the
// next removal writes a fresh one.

// TombCause says why a session left the sessions map.
type TombCause uint32

// The causes, as numbered by enum tomb_cause in aegis.c.
const (
	TombRevoked = TombCause(bpf.AegisTombCauseTOMB_REVOKED)
	TombExpired = TombCause(bpf.AegisTombCauseTOMB_EXPIRED)
)

func (c TombCause) String() string {
	switch c {
	case TombRevoked:
		return "revoked"
	case TombExpired:
		return "expired"
	}
	return fmt.Sprintf("cause %d", uint32(c))
}

// revokedMark is the expires_ns of a session that was revoked while the
// tombstone map was full, kept in the map as its own tombstone: a
// lifetime that ended before any grant could have been made (the clock
// starts at boot), so the data path and SessionVerdict find it expired.
const revokedMark = 1

// Tomb is one tombstone.
type Tomb struct {
	Key   Key
	Cause TombCause
	// Removed is when the session was removed, LastSeen the last outbound
	// packet that the tombstone refused a flow for (Removed if none), on
	// the data path's clock (Now).
	Removed, LastSeen uint64
}

// Live reports whether the egress program still refuses flows for the
// tombstone at now, given the config's UDP flow idle timeout.
func (t Tomb) Live(cfg Config, now uint64) bool {
	live, _ := bpf.TombVerdict(&bpf.AegisTombValue{LastSeenNs: t.LastSeen}, tombIdle(cfg), now)
	return live
}

// tombIdle is bpf.TombIdle of the config.
func tombIdle(cfg Config) uint64 {
	v := bpf.AegisConfigValue{FlowIdleTcpNs: uint64(cfg.FlowIdleTCP), FlowIdleUdpNs: uint64(cfg.FlowIdleUDP),
		FlowIdleIcmpNs: uint64(cfg.FlowIdleICMP)}
	return bpf.TombIdle(&v)
}

func tombValue(cause TombCause, now uint64) bpf.AegisTombValue {
	return bpf.AegisTombValue{LastSeenNs: now, RemovedNs: now, Cause: uint32(cause)}
}

// hasTombs reports whether the set has the tombstone maps. Sets that a
// test builds by hand from a loaded collection may not; their removals
// are plain deletes.
func (m *Maps) hasTombs() bool { return m.TombsV4 != nil && m.TombsV6 != nil }

// updateTomb writes v under k with the given flags and returns the
// library's error as is.
func (m *Maps) updateTomb(k Key, v *bpf.AegisTombValue, flags ebpf.MapUpdateFlags) error {
	mp, kk := keyed(k, m.TombsV4, m.TombsV6)
	return mp.Update(kk, v, flags)
}

// tombsOf returns the tombstone map of a sessions map's family.
func (m *Maps) tombsOf(sessions *ebpf.Map) *ebpf.Map {
	if sessions == m.SessionsV4 {
		return m.TombsV4
	}
	return m.TombsV6
}

// errTombsFull is what a tombstone write returns for a full map.
var errTombsFull = errors.New("tombstone map is full")

func tombError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOMEM):
		return errTombsFull
	}
	return fmt.Errorf("write tombstone: %w", err)
}

// putTomb writes k's tombstone such that no sweep deletes it unseen (see
// the top of this file). The caller holds k's lock.
func (m *Maps) putTomb(k Key, v *bpf.AegisTombValue) error {
	if m.unguardedTombs {
		return tombError(m.updateTomb(k, v, ebpf.UpdateAny))
	}
	return m.ordered("tombstone "+k.String(),
		func() error { return tombError(m.updateTomb(k, v, ebpf.UpdateAny)) },
		func() (bool, error) {
			err := m.updateTomb(k, v, ebpf.UpdateNoExist)
			if errors.Is(err, ebpf.ErrKeyExist) {
				return false, nil
			}
			return err == nil, tombError(err)
		})
}

// LookupTomb returns the tombstone of k. Returns ErrNotFound if there is
// none.
func (m *Maps) LookupTomb(k Key) (Tomb, error) {
	if err := k.Validate(); err != nil {
		return Tomb{}, err
	}
	var v bpf.AegisTombValue
	mp, kk := keyed(k, m.TombsV4, m.TombsV6)
	err := mp.Lookup(kk, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Tomb{}, ErrNotFound
	}
	if err != nil {
		return Tomb{}, fmt.Errorf("lookup tombstone: %w", err)
	}
	return tombFrom(k, &v), nil
}

func tombFrom(k Key, v *bpf.AegisTombValue) Tomb {
	return Tomb{Key: k, Cause: TombCause(v.Cause), Removed: v.RemovedNs, LastSeen: v.LastSeenNs}
}

// Tombs iterates over every tombstone, IPv4 first, as Sessions does.
func (m *Maps) Tombs() iter.Seq2[Tomb, error] {
	return func(yield func(Tomb, error) bool) {
		vals := make([]bpf.AegisTombValue, batchSize)
		err := eachBatch(m.TombsV4, make([]bpf.AegisSessionKeyV4, batchSize), vals,
			func(keys []bpf.AegisSessionKeyV4, vals []bpf.AegisTombValue) bool {
				for i := range keys {
					if !yield(tombFrom(keyFromV4(&keys[i]), &vals[i]), nil) {
						return false
					}
				}
				return true
			})
		if err == nil {
			err = eachBatch(m.TombsV6, make([]bpf.AegisSessionKeyV6, batchSize), vals,
				func(keys []bpf.AegisSessionKeyV6, vals []bpf.AegisTombValue) bool {
					for i := range keys {
						if !yield(tombFrom(keyFromV6(&keys[i]), &vals[i]), nil) {
							return false
						}
					}
					return true
				})
		}
		if err != nil && !errors.Is(err, errStopped) {
			yield(Tomb{}, err)
		}
	}
}

// TombFill counts the tombstones of both maps, and those of them that
// still refuse flows at now given cfg (Active).
func (m *Maps) TombFill(cfg Config, now uint64) (v4, v6 Fill, err error) {
	v4.Capacity, v6.Capacity = int(m.TombsV4.MaxEntries()), int(m.TombsV6.MaxEntries())
	for t, err := range m.Tombs() {
		if err != nil {
			return v4, v6, err
		}
		f := &v6
		if t.Key.Is4() {
			f = &v4
		}
		f.Entries++
		if t.Live(cfg, now) {
			f.Active++
		}
	}
	return v4, v6, nil
}

// TombResult counts what a sweep did to the tombstones of one family.
type TombResult struct {
	// Scanned is the number of tombstones read, Deleted the number found
	// idle past the UDP flow idle timeout and deleted.
	Scanned, Deleted int
}

// sweepTombs deletes the tombstones of mp that no longer refuse anything at
// j.now, in sections like the sessions' (sweep.go): a revoke's tombstone
// written between a section's re-read and its delete is written again by
// the revoke (putTomb). It stops between two sections when ctx ends.
func sweepTombs[K any](ctx context.Context, s *Sweeper, j *judge, m *Maps, mp *ebpf.Map, toKey func(*K) Key,
	res *TombResult, interrupted *int) error {
	keys := make([]K, batchSize)
	vals := make([]bpf.AegisTombValue, batchSize)
	var stale []K
	err := eachBatch(mp, keys, vals, func(keys []K, vals []bpf.AegisTombValue) bool {
		res.Scanned += len(keys)
		for i := range keys {
			if live, _ := bpf.TombVerdict(&vals[i], j.tombIdle, j.now); !live {
				stale = append(stale, keys[i])
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	for len(stale) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		part := stale[:min(len(stale), sectionSize)]
		stale = stale[len(part):]
		if err := s.inSection(m, interrupted, func() error { return deleteStale(s, j, mp, part, toKey, res) }); err != nil {
			return err
		}
	}
	return nil
}

// deleteStale re-reads each candidate inside a section and deletes those
// still stale.
func deleteStale[K any](s *Sweeper, j *judge, mp *ebpf.Map, keys []K, toKey func(*K) Key, res *TombResult) error {
	var v bpf.AegisTombValue
	for i := range keys {
		err := mp.Lookup(&keys[i], &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read tombstone %s: %w", toKey(&keys[i]), err)
		}
		if live, _ := bpf.TombVerdict(&v, j.tombIdle, j.now); live {
			continue
		}
		if s.beforeTombDelete != nil {
			s.beforeTombDelete()
		}
		err = mp.Delete(&keys[i])
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("delete tombstone %s: %w", toKey(&keys[i]), err)
		}
		res.Deleted++
	}
	return nil
}

// RevokesKeptDead returns how many revokes through m found the tombstone
// map full and kept their session in the map, dead, instead.
func (m *Maps) RevokesKeptDead() uint64 { return m.stats.keptDead.Load() }
