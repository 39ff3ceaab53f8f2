package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the map-level mechanics of reaping expired sessions; the
// reaper daemon (package reaper) schedules sweeps, logs and counts them.
// The writers' half of the protocol below is in guard.go.
//
// A sweep reads each sessions map with BPF_MAP_LOOKUP_BATCH into buffers
// that the Sweeper reuses and judges every entry with bpf.SessionVerdict
// (the data path's own rule, with the config map's default idle timeout).
// The entries it finds expired it deletes in sections, at most sectionSize
// at a time: it takes the sweep lock (an exclusive flock on the directory
// SweepLockDir in the pin path), makes the sweep sequence (the pinned
// array sweep_seq) odd, reads each candidate's value again with
// BPF_MAP_LOOKUP_ELEM and judges it again, deletes the keys still expired
// with BPF_MAP_DELETE_BATCH, then makes the sequence even and unlocks. It
// never puts anything back.
//
// Why no sweep deletes a session that the data path would still pass, and
// no revoke is undone:
//
//   - now is sampled before the maps are read, and the data path's clock
//     (CLOCK_MONOTONIC_COARSE, see Now) only moves forward. A session that
//     is expired at now is expired at every later instant too, and the data
//     path never refreshes a session it finds expired. So no packet makes
//     an expired value live again.
//   - Only a writer through this package can: a grant (or a move, or the
//     undo of a failed GrantAll) replaces the value of a key with a fresh
//     one, or inserts one. The kernel has no conditional delete
//     ("delete if the value is still V") for a hash map without a
//     bpf_spin_lock in its value, so a grant G that lands between the
//     section's re-read L and its delete D is deleted with the key. The
//     sequence makes G see that: G reads the sequence (R1), writes (U),
//     and reads it again (R2), each a syscall that completes before the
//     next starts. Every read and write of the sequence takes its
//     bpf_spin_lock (BPF_F_LOCK): a plain array lookup is a memcpy that
//     may see half of an update, and the lock's acquire and release also
//     carry this order across CPUs on weakly ordered machines, where the
//     RCU lookup L could otherwise be performed before the odd write
//     before it is visible. The section's write of the odd value S comes before L
//     in its thread, and L < U < D on the element; so R2, after U, reads S
//     or later. If R1 came before S it read less: R1 != R2. Otherwise R1
//     read S (odd) or the section's closing even value, which comes after
//     D, after U, after R1: impossible. So every G that a section may have
//     deleted sees R1 odd or R1 != R2, and then takes the sweep lock
//     shared, which it gets only once the section has ended (or its holder
//     died: the kernel releases a dead process's flock when its last
//     thread has left its last syscall), and inserts its value again with
//     BPF_NOEXIST: if the key exists again, that is its own value or a
//     newer one, kept (one syscall where a lookup and an insert would be
//     two). Only then does G return; if the insert finds the map full
//     (other keys took the room), G returns ErrFull, not success. A G that
//     saw R1 == R2, even, overlapped no section's L..D, and its value is
//     not deleted by a later section while it is live: that section
//     re-reads it first.
//   - So a grant is acknowledged only once its value is in the map for
//     good, and the one thing that re-inserts a value is that grant's own
//     repair, before it returns. A revoke is a plain delete. This
//     process's grants and revokes of one key are serialized (keyLocks),
//     so no revoke of a key runs between a grant's write and its repair: a
//     revoke issued after a grant returned is never undone. (Another
//     process's revoke that lands inside a grant's repair window is
//     concurrent with that grant and may be ordered before it; the control
//     plane is the only process that grants and revokes.)
//   - A sweep killed at any point leaves at most one section open: the
//     sequence odd, the lock released by the kernel. Every grant that
//     overlapped it repairs as above, so no acknowledged grant is lost.
//     Until the next sweep closes it (Sweep does at its start) every grant
//     sees an odd R1 and pays one flock and one insert attempt.
//
// Tombstones (tomb.go) follow the same rules, so that a revoke still
// always wins:
//
//   - A section writes an expired session's tombstone before it deletes
//     the session, inside the section, so no instant has neither. A full
//     tombstone map keeps that session (dead: expired is expired for good)
//     for a later sweep; nothing expired is ever made live.
//   - Revoke writes its tombstone before its delete, through the same
//     sequence check as a grant: a section that deletes stale tombstones
//     re-reads each under the lock, so a tombstone written before that
//     re-read is fresh and kept, and one written between re-read and
//     delete sees the odd or changed sequence and is written again under
//     the shared lock before Revoke deletes the session. The sweep's own
//     tombstone write may replace a revoke's (same key, both fresh), which
//     changes only the recorded cause.
//   - A tombstone is stale only after the UDP flow idle timeout without a
//     refused packet, judged at the sweep's now; the egress program never
//     refreshes a stale one, so it stays stale, as an expired session
//     does.
//
// TestRevokeTombRaceWithTombSweep puts a revoke's tombstone write between
// a tombstone section's re-read and its delete.
//
// Writers take the lock only after they saw a section overlap their
// write, and a section is taken only after the previous one ended: the
// shared holders at any time are the few grants that overlapped the last
// section, so readers cannot starve the sweep and the sweep holds up a
// grant for at most one section.
//
// TestSweepStressGrantRevoke races grant/revoke pairs of sessions at the
// edge of expiry against sweeps in other goroutines and finds none lost
// and none resurrected; run against the earlier design (SetLegacySweep:
// LookupAndDelete and a put-back with BPF_NOEXIST of a value found live)
// it finds both. TestSweepRegrantInSection puts a grant between a
// section's re-read and its delete; TestGrantRepairsAfterDeadSweep has a
// section's holder die after deleting a grant, with and without room to
// put it back; TestRevokeWaitsForOverlappingGrant checks the per-key
// serialization; e2e TestReaperKilledDuringGrants stops the real
// aegis-reaper inside its sections, grants the sessions it is deleting
// and SIGKILLs it, a hundred times, and fails without the repair.
//
// The scan walks the hash table by bucket index, so entries deleted,
// inserted or replaced meanwhile neither restart nor stop it. It may miss
// a session inserted during the sweep; the next sweep finds it.

// sectionSize bounds the deletes of one section, and so how long a grant
// that overlapped it waits: about one re-read and one delete each.
const sectionSize = 256

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
	// Regranted counts sessions that were expired when scanned and live
	// when read again before the delete (granted again meanwhile): kept.
	Regranted int
	// Vanished counts sessions that were expired when scanned and gone
	// before the delete (revoked meanwhile).
	Vanished int
	// Kept counts expired sessions left in the map, dead, because the
	// tombstone map had no room for their tombstones (tomb.go): the next
	// sweep tries again.
	Kept int
}

// Reaped is the number of sessions deleted.
func (f FamilyResult) Reaped() int { return f.Idle + f.Lifetime }

// SweepResult is what one sweep did.
type SweepResult struct {
	V4, V6 FamilyResult
	// DefaultIdleTimeout is the config map's default the sweep judged with.
	DefaultIdleTimeout time.Duration
	// Interrupted counts the sections that an earlier sweep left open
	// because its process died inside them, which this sweep closed.
	Interrupted int
	// TombsV4 and TombsV6 count what the sweep did to the tombstones.
	TombsV4, TombsV6 TombResult
}

// Scanned is the number of entries read from both maps.
func (r SweepResult) Scanned() int { return r.V4.Scanned + r.V6.Scanned }

// Reaped is the number of sessions deleted from both maps.
func (r SweepResult) Reaped() int { return r.V4.Reaped() + r.V6.Reaped() }

// Sweeper deletes expired sessions. It owns the batch buffers, which it
// reuses from one sweep to the next; use it from one goroutine at a time.
// Several Sweepers, in one process or several, may sweep the same maps at
// once: their sections take turns.
type Sweeper struct {
	keys4 []bpf.AegisSessionKeyV4
	keys6 []bpf.AegisSessionKeyV6
	vals  []bpf.AegisSessionValue
	// del4 and del6 hold the keys a section deletes, idx their indices in
	// the batch; cand holds the indices of a batch's expired entries,
	// deleted those of a section that it deleted, reported once the
	// section is closed.
	del4               []bpf.AegisSessionKeyV4
	del6               []bpf.AegisSessionKeyV6
	cand, idx, deleted []int
	reaped             Reaped
	// lock is the sweep lock directory, open during a sweep.
	lock *os.File

	// Test hooks. afterScan runs after each batch is read and before its
	// expired entries are deleted; beforeDelete runs in a section between
	// the re-read of an expired session and its delete. Tests race grants
	// in there.
	afterScan, beforeDelete func()
	// beforeTombDelete runs in a tombstone section between the re-read of
	// a stale tombstone and its delete.
	beforeTombDelete func()

	// legacy selects the earlier design, for tests that show what this
	// one fixes: no sections, LookupAndDelete of each expired session and
	// a put-back with BPF_NOEXIST of one found live, beforePutBack running
	// before the put-back.
	legacy        bool
	beforePutBack func()
	old           bpf.AegisSessionValue
}

// NewSweeper allocates a Sweeper's buffers (about 450 KiB).
func NewSweeper() *Sweeper {
	return &Sweeper{
		keys4:   make([]bpf.AegisSessionKeyV4, batchSize),
		keys6:   make([]bpf.AegisSessionKeyV6, batchSize),
		vals:    make([]bpf.AegisSessionValue, batchSize),
		del4:    make([]bpf.AegisSessionKeyV4, 0, sectionSize),
		del6:    make([]bpf.AegisSessionKeyV6, 0, sectionSize),
		cand:    make([]int, 0, batchSize),
		idx:     make([]int, 0, sectionSize),
		deleted: make([]int, 0, sectionSize),
	}
}

// Sweep deletes every session of m that the data path refuses now: past
// its idle timeout (its own, or the config map's default as read at the
// start of the sweep) or its lifetime, each after writing its tombstone
// (tomb.go). Before the sessions it deletes the tombstones that no longer
// refuse anything. onReap, if not nil, is called for each deleted session,
// outside the sections.
//
// It stops between two sections when ctx ends and returns what it did so
// far with ctx's error. It first closes a section that a dead sweep left
// open (see the top of this file).
func (s *Sweeper) Sweep(ctx context.Context, m *Maps, onReap func(*Reaped)) (SweepResult, error) {
	var res SweepResult
	cfg, err := m.ReadConfig()
	if err != nil {
		return res, err
	}
	res.DefaultIdleTimeout = cfg.DefaultIdleTimeout
	if m.SweepSeq == nil {
		return res, fmt.Errorf("sweep: %w: no sweep sequence map", ErrNotLoaded)
	}
	if !s.legacy {
		// Kept open for the sweep's sections, which flock it exclusively.
		if s.lock, err = m.openSweepLock(); err != nil {
			return res, err
		}
		defer func() { s.lock.Close(); s.lock = nil }()
		if err := s.closeInterrupted(m, &res); err != nil {
			return res, err
		}
	}
	// After the config and before any session is read: see the top of
	// this file for why the order matters.
	j := judge{defaultIdle: uint64(cfg.DefaultIdleTimeout), now: Now(), tombIdle: tombIdle(cfg), onReap: onReap}

	// The tombstones before the sessions, so that the room the stale ones
	// leave serves this sweep's burials.
	if m.hasTombs() && !s.legacy {
		err = sweepTombs(ctx, s, &j, m, m.TombsV4, keyFromV4, &res.TombsV4, &res.Interrupted)
		if err == nil {
			err = sweepTombs(ctx, s, &j, m, m.TombsV6, keyFromV6, &res.TombsV6, &res.Interrupted)
		}
		if err != nil {
			return res, err
		}
	}
	err = sweepMap(ctx, s, &j, m, m.SessionsV4, s.keys4, s.del4, keyFromV4, &res.V4, &res.Interrupted)
	if err == nil {
		err = sweepMap(ctx, s, &j, m, m.SessionsV6, s.keys6, s.del6, keyFromV6, &res.V6, &res.Interrupted)
	}
	return res, err
}

// closeInterrupted makes the sequence even if a dead sweep left it odd,
// so that grants stop paying for the open section.
func (s *Sweeper) closeInterrupted(m *Maps, res *SweepResult) error {
	seq, err := readSeq(m.SweepSeq)
	if err != nil || seq%2 == 0 {
		return err
	}
	// Odd: a section is open, or was left open. Under the lock, no live
	// sweep holds one.
	if err := s.flock(unix.LOCK_EX); err != nil {
		return err
	}
	defer s.flock(unix.LOCK_UN)
	if seq, err = readSeq(m.SweepSeq); err != nil || seq%2 == 0 {
		return err
	}
	res.Interrupted++
	return writeSeq(m.SweepSeq, seq+1)
}

func (s *Sweeper) flock(how int) error {
	for {
		err := unix.Flock(int(s.lock.Fd()), how)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("lock %s: %w", s.lock.Name(), err)
		}
		return nil
	}
}

type judge struct {
	defaultIdle, now uint64
	tombIdle         uint64 // bpf.TombIdle of the config
	onReap           func(*Reaped)
}

// sweepMap sweeps one sessions map; keys is the Sweeper's key buffer for
// its key type and toKey converts one of its entries.
func sweepMap[K any](ctx context.Context, s *Sweeper, j *judge, m *Maps, mp *ebpf.Map, keys, del []K,
	toKey func(*K) Key, res *FamilyResult, interrupted *int) error {
	// The syscalls pass raw pointers into keys and s.vals: make sure their
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
		if s.legacy {
			reapBatchLegacy(s, j, mp, keys[:n], toKey, res)
		} else {
			s.cand = s.cand[:0]
			for i := range n {
				if _, expired := expiry(&s.vals[i], j.defaultIdle, j.now); expired {
					s.cand = append(s.cand, i)
				}
			}
			for c := s.cand; len(c) > 0; {
				if len(c) < len(s.cand) {
					if err := ctx.Err(); err != nil {
						return err
					}
				}
				part := c[:min(len(c), sectionSize)]
				c = c[len(part):]
				if err := section(s, j, m, mp, keys, del, part, toKey, res, interrupted); err != nil {
					return err
				}
			}
		}
		if last {
			return nil
		}
	}
}

// section deletes the batch entries at indices cand that are still
// expired, under the sweep lock and an odd sequence, then reports them.
func section[K any](s *Sweeper, j *judge, m *Maps, mp *ebpf.Map, keys, del []K, cand []int,
	toKey func(*K) Key, res *FamilyResult, interrupted *int) (err error) {
	s.deleted = s.deleted[:0]
	err = s.inSection(m, interrupted, func() error {
		return reapSection(s, j, m, mp, keys, del, cand, toKey, res)
	})
	if j.onReap != nil {
		for _, i := range s.deleted {
			v := &s.vals[i]
			cause, _ := expiry(v, j.defaultIdle, j.now)
			s.reaped = Reaped{Key: toKey(&keys[i]), Cause: cause,
				Idle: max(0, time.Duration(int64(j.now-v.LastSeenNs))), value: *v}
			j.onReap(&s.reaped)
		}
	}
	return err
}

// inSection runs del, which deletes, as one section: under the exclusive
// sweep lock with the sequence odd. interrupted, if not nil, counts a
// section found left open by a dead sweep.
func (s *Sweeper) inSection(m *Maps, interrupted *int, del func() error) error {
	if err := s.flock(unix.LOCK_EX); err != nil {
		return err
	}
	seq, err := readSeq(m.SweepSeq)
	if err != nil {
		s.flock(unix.LOCK_UN)
		return err
	}
	if seq%2 == 1 {
		// Left open by a sweep that died after Sweep's check.
		if interrupted != nil {
			*interrupted++
		}
		seq++
	}
	if err := writeSeq(m.SweepSeq, seq+1); err != nil {
		s.flock(unix.LOCK_UN)
		return err
	}
	err = del()
	// Closed even after a failed delete: the section is over. Should the
	// write fail, the sequence stays odd, which costs grants a check each
	// until the next sweep closes it, and loses nothing.
	err = errors.Join(err, writeSeq(m.SweepSeq, seq+2))
	return errors.Join(err, s.flock(unix.LOCK_UN))
}

// reapBatchLegacy is the earlier design's delete of a batch's expired
// entries, kept for tests only (see Sweeper.legacy). Without its retry of
// a put-back that found the map full, which the tests do not exercise.
func reapBatchLegacy[K any](s *Sweeper, j *judge, mp *ebpf.Map, keys []K, toKey func(*K) Key, res *FamilyResult) {
	for i := range keys {
		if _, expired := expiry(&s.vals[i], j.defaultIdle, j.now); !expired {
			continue
		}
		err := mp.LookupAndDelete(unsafe.Pointer(&keys[i]), unsafe.Pointer(&s.old))
		if err != nil {
			res.Vanished++
			continue
		}
		cause, expired := expiry(&s.old, j.defaultIdle, j.now)
		if !expired {
			res.Regranted++
			if s.beforePutBack != nil {
				s.beforePutBack()
			}
			_ = mp.Update(unsafe.Pointer(&keys[i]), unsafe.Pointer(&s.old), ebpf.UpdateNoExist)
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
}

// reapSection re-reads each candidate and deletes those still expired,
// with one BPF_MAP_DELETE_BATCH, which took a fifth less CPU than a
// BPF_MAP_DELETE_ELEM per key in BenchmarkSweep. del is the Sweeper's key
// buffer of the map's key type.
func reapSection[K any](s *Sweeper, j *judge, m *Maps, mp *ebpf.Map, keys, del []K, cand []int,
	toKey func(*K) Key, res *FamilyResult) error {
	del, idx := del[:0], s.idx[:0]
	// The tombstones' clock: later than j.now, so that they start fresh.
	now := Now()
	for _, i := range cand {
		// unsafe.Pointer skips the library's reflection on each call, a
		// third of the user time of a large sweep; sweepMap checked the
		// sizes.
		v := &s.vals[i]
		err := mp.Lookup(unsafe.Pointer(&keys[i]), unsafe.Pointer(v))
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			res.Vanished++
			continue
		}
		if err != nil {
			return fmt.Errorf("read expired session %s: %w", toKey(&keys[i]), err)
		}
		if _, expired := expiry(v, j.defaultIdle, j.now); !expired {
			res.Regranted++
			continue
		}
		if m.hasTombs() {
			// Before the delete (see tomb.go). A full map keeps the
			// session, dead, in its place until a later sweep.
			cause := TombExpired
			if v.ExpiresNs == revokedMark {
				cause = TombRevoked
			}
			tv := tombValue(cause, now)
			// The tombstone's key is the session's: same type, same bytes.
			err := tombError(m.tombsOf(mp).Update(unsafe.Pointer(&keys[i]), unsafe.Pointer(&tv), ebpf.UpdateAny))
			if errors.Is(err, errTombsFull) {
				res.Kept++
				continue
			}
			if err != nil {
				return fmt.Errorf("bury expired session %s: %w", toKey(&keys[i]), err)
			}
		}
		if s.beforeDelete != nil {
			s.beforeDelete()
		}
		del, idx = append(del, keys[i]), append(idx, i)
	}
	// The batch stops at a key that is gone (revoked since its re-read)
	// and says how many it deleted before it.
	for off := 0; off < len(del); {
		n, err := mp.BatchDelete(del[off:], nil)
		for _, i := range idx[off : off+n] {
			if cause, _ := expiry(&s.vals[i], j.defaultIdle, j.now); cause == ExpiredLifetime {
				res.Lifetime++
			} else {
				res.Idle++
			}
			s.deleted = append(s.deleted, i)
		}
		off += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			res.Vanished++
			off++
			continue
		}
		if err != nil {
			return fmt.Errorf("delete expired sessions of %s: %w", mp, err)
		}
	}
	return nil
}
