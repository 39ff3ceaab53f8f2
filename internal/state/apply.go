package state

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the writes of a control plane that keeps its sessions in
// a store (package store): the maps are then a cache of the store, and
// these two calls bring a cached session in line with it without losing
// what the data path knows better, its last packet.

// Apply writes s as the store holds it: user, creation time, lifetime and
// idle timeout replace what the map has, and last_seen becomes the later
// of s's and the map's, so that a resynchronisation never makes a busy
// session look idler than it is. It writes through the sweep protocol
// (guarded), like a grant.
//
// Returns ErrInvalid for a malformed session and ErrFull if the map is at
// capacity.
func (m *Maps) Apply(s Session) error {
	if err := s.Validate(); err != nil {
		return err
	}
	v := s.value()
	return m.guarded(s.Key, func() (*bpf.AegisSessionValue, error) {
		var old bpf.AegisSessionValue
		if m.lookup(s.Key, &old) == nil && int64(old.LastSeenNs-v.LastSeenNs) > 0 {
			v.LastSeenNs = old.LastSeenNs
		}
		return &v, updateError(m.update(s.Key, &v, ebpf.UpdateAny))
	})
}

// Touch raises the last_seen of the session at k to seen, the time
// another gateway saw it pass traffic. It never lowers it, and never
// touches a session the data path already refuses (at now, with the
// config's default idle timeout defaultIdle): like the data path, it
// does not revive an expired session, so a sweep's judgment of one stays
// right (see sweep.go). It reports whether it wrote.
//
// Returns ErrNotFound if there is no session at k.
func (m *Maps) Touch(k Key, seen, defaultIdle, now uint64) (bool, error) {
	if err := k.Validate(); err != nil {
		return false, err
	}
	defer lockKey(k).Unlock()
	var v bpf.AegisSessionValue
	if err := m.lookup(k, &v); err != nil {
		return false, err
	}
	if r, _ := bpf.SessionVerdict(&v, defaultIdle, now); r == bpf.ReasonExpired {
		return false, nil
	}
	if int64(seen-v.LastSeenNs) <= 0 {
		return false, nil
	}
	v.LastSeenNs = seen
	// BPF_EXIST: a session revoked or reaped since the lookup stays gone.
	err := m.update(k, &v, ebpf.UpdateExist)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, ErrNotFound
	}
	if err != nil {
		return false, fmt.Errorf("touch session: %w", err)
	}
	return true, nil
}

func (m *Maps) lookup(k Key, v *bpf.AegisSessionValue) error {
	var err error
	if k.Is4() {
		kk := k.v4()
		err = m.SessionsV4.Lookup(&kk, v)
	} else {
		kk := k.v6()
		err = m.SessionsV6.Lookup(&kk, v)
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("lookup session: %w", err)
	}
	return nil
}
