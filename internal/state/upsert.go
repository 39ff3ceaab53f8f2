package state

import (
	"errors"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the grant paths: Upsert (behind Grant too), which costs
// three syscalls for a new session and reports what it did, and GrantAll,
// which applies several sessions or none. Both write through guarded (see
// guard.go). Their Checked forms let the caller refuse to replace the
// session a grant finds, at no extra cost.

// Check decides whether a grant may replace old, the session it found at
// its key; an error refuses the grant and is returned as it is. It runs
// only when the key holds a session, between reading it and overwriting
// it, under the key's lock (see guard.go), so no other grant of the key
// through this process runs in between.
type Check func(old *Session) error

// Upsert grants or refreshes a session: a refresh
// replaces the timestamps, lifetime, idle timeout and user, and keeps the
// creation time if the user is the same (a session passed to another user
// is that user's new session). It returns the session as the map now holds
// it and whether it is new. A new session costs three syscalls (an insert
// that fails if the key exists, between two reads of the sweep sequence), a
// refresh five; one that overlapped a sweep deleting sessions waits for
// it and checks its write (see sweep.go). When Upsert returns nil the data
// path already passes the session's next packet.
//
// Returns ErrInvalid for a malformed session and ErrFull if the map is at
// capacity; in both cases the map is unchanged. ErrFull also reports a
// session that a sweep deleted while it was written and that no longer
// fits when it is written again.
func (m *Maps) Upsert(s Session) (stored Session, created bool, err error) {
	return m.UpsertChecked(s, nil)
}

// UpsertChecked is Upsert, except that a session already at the key is
// replaced only if check (when not nil) returns nil; otherwise the map is
// unchanged and check's error returned.
func (m *Maps) UpsertChecked(s Session, check Check) (stored Session, created bool, err error) {
	if err := s.Validate(); err != nil {
		return Session{}, false, err
	}
	stored, created, _, err = m.upsert(s, check)
	return stored, created, err
}

// upsert writes a validated session and returns, for a refresh, the value
// it replaced (when it could read it).
func (m *Maps) upsert(s Session, check Check) (stored Session, created bool, old *bpf.AegisSessionValue, err error) {
	v := s.value()
	err = m.guarded(s.Key, func() (*bpf.AegisSessionValue, error) {
		var err error
		if s.Is4() {
			k := s.v4()
			created, old, err = upsert(m.SessionsV4, &k, &v, s.Key, check)
		} else {
			k := s.v6()
			created, old, err = upsert(m.SessionsV6, &k, &v, s.Key, check)
		}
		return &v, err
	})
	if err != nil {
		return Session{}, false, nil, err
	}
	return sessionFrom(s.Key, &v), created, old, nil
}

// upsert inserts v, or, when the key exists and check (if any) accepts
// what is there, overwrites it keeping its creation time (which it writes
// back into v) if the user is the same. key is k, for check.
func upsert[K any](mp *ebpf.Map, k *K, v *bpf.AegisSessionValue, key Key, check Check) (created bool, old *bpf.AegisSessionValue, err error) {
	err = mp.Update(k, v, ebpf.UpdateNoExist)
	if err == nil {
		return true, nil, nil
	}
	if !errors.Is(err, ebpf.ErrKeyExist) {
		return false, nil, updateError(err)
	}
	var prev bpf.AegisSessionValue
	if mp.Lookup(k, &prev) == nil {
		if check != nil {
			found := sessionFrom(key, &prev)
			if err := check(&found); err != nil {
				return false, nil, err
			}
		}
		old = &prev
		if prev.CreatedNs != 0 && prev.User == v.User {
			v.CreatedNs = prev.CreatedNs
		}
	}
	// UpdateAny, not UpdateExist: if the reaper deleted the session in
	// between, the grant still holds.
	return false, old, updateError(mp.Update(k, v, ebpf.UpdateAny))
}

// grantUndo reverts one applied grant of GrantAll.
type grantUndo struct {
	key Key
	old *bpf.AegisSessionValue // nil: the grant created the session
}

// GrantAll grants every session of ss or none: when one fails, those
// already applied are undone (new ones deleted, refreshed ones restored)
// before the error is returned. It reports for each session whether it is
// new. Every session is validated before anything is written.
//
// Returns ErrInvalid for a malformed session and ErrFull if a map is at
// capacity.
func (m *Maps) GrantAll(ss []Session) (created []bool, err error) {
	return m.GrantAllChecked(ss, nil)
}

// GrantAllChecked is GrantAll, with check (when not nil) asked before each
// existing session is replaced, as in UpsertChecked: a refusal undoes the
// grants already applied and is returned.
func (m *Maps) GrantAllChecked(ss []Session, check Check) (created []bool, err error) {
	for i := range ss {
		if err := ss[i].Validate(); err != nil {
			return nil, err
		}
	}
	undos := make([]grantUndo, 0, len(ss))
	created = make([]bool, len(ss))
	for i, s := range ss {
		_, c, old, err := m.upsert(s, check)
		if err != nil {
			m.undo(undos)
			return nil, err
		}
		created[i] = c
		undos = append(undos, grantUndo{s.Key, old})
	}
	return created, nil
}

func (m *Maps) undo(undos []grantUndo) {
	for i := len(undos) - 1; i >= 0; i-- {
		u := undos[i]
		if u.old == nil {
			_ = m.Revoke(u.key)
			continue
		}
		_ = m.guarded(u.key, func() (*bpf.AegisSessionValue, error) {
			return u.old, updateError(m.update(u.key, u.old, ebpf.UpdateAny))
		})
	}
}
