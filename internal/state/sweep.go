package state

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the map-level mechanics of reaping expired sessions; the
// reaper daemon (package reaper) schedules sweeps, logs and counts them.
//
// A sweep reads each sessions map with BPF_MAP_LOOKUP_BATCH into buffers
// that the Sweeper reuses, judges every entry with bpf.SessionVerdict (the
// data path's own rule, with the config map's default idle timeout), and
// removes each expired one with BPF_MAP_LOOKUP_AND_DELETE_ELEM.
//
// Why it never deletes a session that the data path would still pass:
//
//   - now is sampled before the maps are read, and the data path's clock
//     (CLOCK_MONOTONIC_COARSE, see Now) only moves forward. A session that
//     is expired at now is expired at every later instant too, and the data
//     path never refreshes a session it finds expired. So once a value is
//     expired at now, no packet can make it live again: the delete races
//     with nothing the data path does.
//   - A writer through this package can: Grant replaces the value of a key
//     with a fresh one. If that lands between the scan that found the key
//     expired and the delete, a delete by key would throw away an
//     acknowledged grant. So the delete is LookupAndDelete, which removes
//     and returns the value atomically (under the bucket lock): the sweep
//     judges exactly what it removed, again at now. If that turns out live,
//     it was granted after the scan, and the sweep puts it back with
//     BPF_NOEXIST, so that a grant or another writer that inserted the key
//     meanwhile keeps its newer value.
//
// The kernel has no conditional delete ("delete if the value is still V")
// for a hash map without a bpf_spin_lock in its value, and the batch
// delete (BPF_MAP_DELETE_BATCH) deletes by key only, so deletes are one
// atomic syscall per expired session. Sessions the scan found live are
// never touched. The price of the restore path is a window, only for a key
// re-granted during the sweep of its batch, in which the key is absent:
// between two syscalls, so microseconds, unless the sweeping thread is
// preempted there (TestSweepConcurrentGrants has seen 15 ms on a loaded
// 2-core machine). A packet of the session in that window is dropped
// (no_session), a Revoke of it reports ErrNotFound and is then undone by
// the restore, and a reaper killed inside it loses the grant. Each needs
// a re-grant of an expired session within milliseconds of the sweep
// reaching it and a second event inside the window; Restored counts how
// often the first half happens. A plain Lookup before each delete would
// make the first half rarer (a re-grant between two syscalls instead of
// since the batch was read) for one more syscall per expired session,
// about half again the cost of a large sweep; it is not done.
//
// The scan walks the hash table by bucket index, so entries deleted,
// inserted or replaced meanwhile neither restart nor stop it. It may miss
// a session inserted during the sweep; the next sweep finds it.

// ErrSessionLost means a session that was re-granted while a sweep was
// deleting it could not be put back, typically because grants of other
// keys filled the map meanwhile. The error names the session and its user.
var ErrSessionLost = errors.New("re-granted session lost")

// Expiry is why the data path refuses a session.
type Expiry uint8

// The ways a session expires.
const (
	// ExpiredIdle: no packet within its idle timeout (its own, or the
	// config map's default).
	ExpiredIdle Expiry = iota + 1
	// ExpiredLifetime: past its expires_ns.
	ExpiredLifetime
)

func (e Expiry) String() string {
	switch e {
	case ExpiredIdle:
		return "idle"
	case ExpiredLifetime:
		return "lifetime"
	}
	return "live"
}

// expiry judges v at now with the data path's rule, and names the reason.
func expiry(v *bpf.AegisSessionValue, defaultIdle, now uint64) (Expiry, bool) {
	if r, _ := bpf.SessionVerdict(v, defaultIdle, now); r != bpf.ReasonExpired {
		return 0, false
	}
	if v.ExpiresNs != 0 && now >= v.ExpiresNs {
		return ExpiredLifetime, true
	}
	return ExpiredIdle, true
}

// Reaped is one session a sweep deleted. The sweep reuses it for the next
// session: callbacks must not keep it.
type Reaped struct {
	Key   Key
	Cause Expiry
	// Idle is how long the session had passed no packet at the sweep's
	// clock reading.
	Idle  time.Duration
	value bpf.AegisSessionValue
}

// User returns the session's user.
func (r *Reaped) User() string { return userString(&r.value.User) }

// Session returns the deleted session.
func (r *Reaped) Session() Session { return sessionFrom(r.Key, &r.value) }

// FamilyResult counts what a sweep did to one sessions map.
type FamilyResult struct {
	// Scanned is the number of entries read.
	Scanned int
	// Idle and Lifetime count the sessions deleted, by cause.
	Idle, Lifetime int
	// Restored counts sessions that were expired when scanned and live
	// when deleted (re-granted meanwhile), and were put back, or found
	// already replaced by a newer grant.
	Restored int
	// Vanished counts sessions that were expired when scanned and gone
	// before the delete (revoked meanwhile).
	Vanished int
}

// Reaped is the number of sessions deleted.
func (f FamilyResult) Reaped() int { return f.Idle + f.Lifetime }

// SweepResult is what one sweep did.
type SweepResult struct {
	V4, V6 FamilyResult
	// DefaultIdleTimeout is the config map's default the sweep judged with.
	DefaultIdleTimeout time.Duration
}

// Scanned is the number of entries read from both maps.
func (r SweepResult) Scanned() int { return r.V4.Scanned + r.V6.Scanned }

// Reaped is the number of sessions deleted from both maps.
func (r SweepResult) Reaped() int { return r.V4.Reaped() + r.V6.Reaped() }

// Sweeper deletes expired sessions. It owns the batch buffers, which it
// reuses from one sweep to the next; use it from one goroutine at a time.
type Sweeper struct {
	keys4 []bpf.AegisSessionKeyV4
	keys6 []bpf.AegisSessionKeyV6
	vals  []bpf.AegisSessionValue
	// old receives LookupAndDelete's value; a field so that passing it to
	// the library does not allocate per session.
	old    bpf.AegisSessionValue
	reaped Reaped

	// Test hooks. afterScan runs after each batch is read and before its
	// expired entries are deleted; beforePutBack runs before a re-granted
	// session is put back. Tests race grants in there.
	afterScan, beforePutBack func()
}

// NewSweeper allocates a Sweeper's buffers (about 450 KiB).
func NewSweeper() *Sweeper {
	return &Sweeper{
		keys4: make([]bpf.AegisSessionKeyV4, batchSize),
		keys6: make([]bpf.AegisSessionKeyV6, batchSize),
		vals:  make([]bpf.AegisSessionValue, batchSize),
	}
}

// Sweep deletes every session of m that the data path refuses now: past
// its idle timeout (its own, or the config map's default as read at the
// start of the sweep) or its lifetime. onReap, if not nil, is called for
// each deleted session.
//
// It stops between two batches when ctx ends and returns what it did so
// far with ctx's error; a batch's deletes are always completed, so that a
// stop never leaves a session deleted that should have been put back. A
// session that was re-granted during the sweep and cannot be put back
// because the map filled up meanwhile is reported in the returned error,
// wrapping ErrSessionLost, after the rest of the sweep is done.
func (s *Sweeper) Sweep(ctx context.Context, m *Maps, onReap func(*Reaped)) (SweepResult, error) {
	var res SweepResult
	cfg, err := m.ReadConfig()
	if err != nil {
		return res, err
	}
	res.DefaultIdleTimeout = cfg.DefaultIdleTimeout
	// After the config and before any session is read: see the top of
	// this file for why the order matters.
	j := judge{defaultIdle: uint64(cfg.DefaultIdleTimeout), now: Now(), onReap: onReap}

	var lost []error
	err = sweepMap(ctx, s, &j, m.SessionsV4, s.keys4, keyFromV4, &res.V4, &lost)
	if err == nil {
		err = sweepMap(ctx, s, &j, m.SessionsV6, s.keys6, keyFromV6, &res.V6, &lost)
	}
	return res, errors.Join(append(lost, err)...)
}

type judge struct {
	defaultIdle, now uint64
	onReap           func(*Reaped)
}

// sweepMap sweeps one sessions map; keys is the Sweeper's key buffer for
// its key type and toKey converts one of its entries.
func sweepMap[K any](ctx context.Context, s *Sweeper, j *judge, mp *ebpf.Map, keys []K,
	toKey func(*K) Key, res *FamilyResult, lost *[]error) error {
	// The deletes pass raw pointers into keys and s.vals: make sure their
	// element sizes are the map's.
	if uintptr(mp.KeySize()) != unsafe.Sizeof(keys[0]) || uintptr(mp.ValueSize()) != unsafe.Sizeof(s.vals[0]) {
		return fmt.Errorf("sweep %s: %w: key or value size differs from this build's", mp, ErrIncompatible)
	}
	var cursor ebpf.MapBatchCursor
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := mp.BatchLookup(&cursor, keys, s.vals, nil)
		last := errors.Is(err, ebpf.ErrKeyNotExist)
		if err != nil && !last {
			return fmt.Errorf("scan %s: %w", mp, err)
		}
		res.Scanned += n
		if s.afterScan != nil {
			s.afterScan()
		}
		if err := reapBatch(s, j, mp, keys[:n], toKey, res, lost); err != nil {
			return err
		}
		if last {
			return nil
		}
	}
}

// restore is a session to put back whose first attempt found the map full.
type restore[K any] struct {
	key K
	val bpf.AegisSessionValue
}

// reapBatch deletes the expired entries among a batch just read into keys
// and s.vals.
func reapBatch[K any](s *Sweeper, j *judge, mp *ebpf.Map, keys []K, toKey func(*K) Key,
	res *FamilyResult, lost *[]error) error {
	var retry []restore[K]
	var failed error
	for i := range keys {
		if _, expired := expiry(&s.vals[i], j.defaultIdle, j.now); !expired {
			continue
		}
		// unsafe.Pointer skips the library's reflection on each call, a
		// third of the user time of a large sweep; sweepMap checked the
		// sizes.
		err := mp.LookupAndDelete(unsafe.Pointer(&keys[i]), unsafe.Pointer(&s.old))
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			res.Vanished++
			continue
		}
		if err != nil {
			// Still put back what this batch holds.
			failed = fmt.Errorf("delete expired session %s: %w", toKey(&keys[i]), err)
			break
		}
		cause, expired := expiry(&s.old, j.defaultIdle, j.now)
		if !expired {
			// Granted again after the scan: put it back.
			res.Restored++
			if s.beforePutBack != nil {
				s.beforePutBack()
			}
			if putBack(mp, &keys[i], &s.old) != nil {
				retry = append(retry, restore[K]{keys[i], s.old})
			}
			continue
		}
		if cause == ExpiredLifetime {
			res.Lifetime++
		} else {
			res.Idle++
		}
		if j.onReap != nil {
			s.reaped = Reaped{Key: toKey(&keys[i]), Cause: cause,
				Idle: max(0, time.Duration(int64(j.now-s.old.LastSeenNs))), value: s.old}
			j.onReap(&s.reaped)
		}
	}
	// Typically a grant of another key took the slot that the delete
	// freed; the batch's later deletes may have made room again. The
	// sweep goes on either way: stopping would not bring the session back.
	for i := range retry {
		r := &retry[i]
		if err := putBack(mp, &r.key, &r.val); err != nil {
			sess := sessionFrom(toKey(&r.key), &r.val)
			*lost = append(*lost, fmt.Errorf("%w: session %s of user %q: %w", ErrSessionLost, sess.Key, sess.User, err))
		}
	}
	return failed
}

// putBack re-inserts a session unless the key exists again, which means a
// newer grant is in place.
func putBack[K any](mp *ebpf.Map, k *K, v *bpf.AegisSessionValue) error {
	err := mp.Update(k, v, ebpf.UpdateNoExist)
	switch {
	case err == nil, errors.Is(err, ebpf.ErrKeyExist):
		return nil
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOMEM):
		return fmt.Errorf("%w: %v", ErrFull, err)
	}
	return err
}
