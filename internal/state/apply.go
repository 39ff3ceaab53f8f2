package state

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

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
		if old, err := m.lookupValue(s.Key); err == nil && int64(old.LastSeenNs-v.LastSeenNs) > 0 {
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
	v, err := m.lookupValue(k)
	if err != nil {
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
	err = m.update(k, &v, ebpf.UpdateExist)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, ErrNotFound
	}
	if err != nil {
		return false, fmt.Errorf("touch session: %w", err)
	}
	return true, nil
}

// InsertNew writes sessions whose keys the maps did not hold when the
// caller last read them, as a restore into fresh maps does, batchSize to a
// system call instead of Apply's four. The kernel's batch update knows no
// BPF_NOEXIST, so a session written under one of these keys meanwhile is
// overwritten: the caller must be these keys' only writer, as the control
// plane's store loop is (the data path never creates a session, and the
// sweep only deletes). It takes no key lock for the same reason. A batch
// is ordered against the sweep as one grant is (guard.go): if a sweep
// section overlapped it, every session of the batch is put back if the
// section deleted it. It reports how many sessions it wrote and calls fail
// for each it could not write (ErrInvalid, ErrFull, or the map's error),
// one call at a time, from any goroutine: the batches are written in
// parallel.
func (m *Maps) InsertNew(ss []Session, fail func(Session, error)) int {
	var mu sync.Mutex
	failed := func(s Session, err error) {
		mu.Lock()
		defer mu.Unlock()
		fail(s, err)
	}
	n4, bad := 0, 0
	for i := range ss {
		if ss[i].Validate() != nil {
			bad++
		} else if ss[i].Is4() {
			n4++
		}
	}
	// Sessions all valid and of one family (a million of them at a
	// restore) are written from ss itself, not a copy.
	var v4, v6 []Session
	switch {
	case bad == 0 && n4 == len(ss):
		v4 = ss
	case bad == 0 && n4 == 0:
		v6 = ss
	default:
		v4, v6 = make([]Session, 0, n4), make([]Session, 0, len(ss)-n4-bad)
		for i := range ss {
			s := &ss[i]
			if bad > 0 { // validated once already when none is invalid
				if err := s.Validate(); err != nil {
					failed(*s, err)
					continue
				}
			}
			if s.Is4() {
				v4 = append(v4, *s)
			} else {
				v6 = append(v6, *s)
			}
		}
	}
	// The kernel's side of a batch (a lookup and an allocation per
	// session) is most of the cost, and batches of different keys do not
	// contend: a million sessions go in on every CPU at once.
	var written atomic.Int64
	var wg sync.WaitGroup
	workers := min(runtime.GOMAXPROCS(0), maxInsertWorkers)
	for _, part := range split(v4, workers, batchSize) {
		wg.Go(func() { written.Add(int64(insertNew(m, m.SessionsV4, part, Key.v4, failed))) })
	}
	for _, part := range split(v6, workers, batchSize) {
		wg.Go(func() { written.Add(int64(insertNew(m, m.SessionsV6, part, Key.v6, failed))) })
	}
	wg.Wait()
	return int(written.Load())
}

// maxInsertWorkers bounds the goroutines of one InsertNew.
const maxInsertWorkers = 4

// split cuts ss into at most n parts of whole batches of size each.
func split(ss []Session, n, size int) [][]Session {
	batches := (len(ss) + size - 1) / size
	per := max(1, (batches+n-1)/n) * size
	var out [][]Session
	for len(ss) > 0 {
		k := min(len(ss), per)
		out = append(out, ss[:k])
		ss = ss[k:]
	}
	return out
}

func insertNew[K any](m *Maps, mp *ebpf.Map, ss []Session, key func(Key) K, fail func(Session, error)) int {
	written := 0
	keys := make([]K, 0, batchSize)
	vals := make([]bpf.AegisSessionValue, 0, batchSize)
	for len(ss) > 0 {
		chunk := ss[:min(len(ss), batchSize)]
		ss = ss[len(chunk):]
		keys, vals = keys[:0], vals[:0]
		var markErr error
		for i := range chunk {
			markErr = errors.Join(markErr, m.markSession(chunk[i].Key))
			keys = append(keys, key(chunk[i].Key))
			vals = append(vals, chunk[i].value())
		}
		if markErr != nil { // a session of an unmarked port would not pass
			for _, s := range chunk {
				fail(s, markErr)
			}
			continue
		}
		done, ran := 0, false
		write := func() error {
			ran = true
			n, err := mp.BatchUpdate(keys, vals, nil)
			if err == nil {
				done = len(chunk)
				return nil
			}
			// A full map stops the batch at the first session that does
			// not fit, and the count says how many went in before it;
			// any other error refuses the batch as a whole, whatever
			// the count says.
			if err = updateError(err); errors.Is(err, ErrFull) {
				done = n
			}
			for _, s := range chunk[done:] {
				fail(s, err)
			}
			return nil
		}
		restore := func() (bool, error) {
			wrote := false
			for j := range done {
				w, err := m.putBack(chunk[j].Key, &vals[j])
				if err != nil {
					fail(chunk[j], err)
				}
				wrote = wrote || w
			}
			return wrote, nil
		}
		if err := m.ordered("a batch of sessions", write, restore); err != nil {
			// Before the write nothing went in; after it, what went in
			// may be deleted by a sweep unseen: both count as failed.
			failed := chunk
			if ran {
				failed = chunk[:done]
			}
			for _, s := range failed {
				fail(s, err)
			}
			continue
		}
		written += done
	}
	return written
}
