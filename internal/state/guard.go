package state

import (
	"errors"
	"fmt"
	"hash/maphash"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the writers' half of the protocol between session writes
// and sweeps, argued at the top of sweep.go: the sweep sequence, the sweep
// lock, and the per-key serialization of this process's writers.

// SweepLockDir is the directory under the pin path that sweeps lock
// exclusively while they delete sessions, and writers shared when a write
// overlapped such a section. It holds nothing: it exists to be flocked.
// It is not the pin directory itself, which the loader locks exclusively
// for a whole load.
const SweepLockDir = "sweeplock"

// SweepLockPath returns the sweep lock directory of a pin path.
func SweepLockPath(pinPath string) string { return filepath.Join(pinPath, SweepLockDir) }

// EnsureSweepLock creates the sweep lock directory under pinPath if it is
// missing (a pin set made by an older loader) and gives it owner root,
// group gid and mode 0750: the daemons, in that group, open it read-only,
// which is all flock needs. The loader calls it under the pin directory's
// lock.
func EnsureSweepLock(pinPath string, gid int) error {
	dir := SweepLockPath(pinPath)
	if err := os.Mkdir(dir, 0o750); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := os.Chown(dir, 0, gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}

// lockSweep takes the sweep lock of the maps' pin path.
func (m *Maps) lockSweep(exclusive bool) (*Lock, error) {
	if m.PinPath == "" {
		return nil, errNotPinned
	}
	l, err := LockDir(SweepLockPath(m.PinPath), exclusive)
	if err != nil {
		return nil, openError(SweepLockPath(m.PinPath), err)
	}
	return l, nil
}

// openSweepLock opens the sweep lock directory without locking it.
func (m *Maps) openSweepLock() (*os.File, error) {
	if m.PinPath == "" {
		return nil, errNotPinned
	}
	f, err := os.Open(SweepLockPath(m.PinPath))
	if err != nil {
		return nil, openError(SweepLockPath(m.PinPath), err)
	}
	return f, nil
}

var errNotPinned = errors.New("sweep lock: the maps are not pinned (no pin path)")

// seqKey is the sweep sequence's only index; a variable so that its
// address can be passed without an allocation.
var seqKey uint32

// readSeq returns the sweep sequence. BPF_F_LOCK makes the kernel copy the
// value under its spin lock, so the read never sees half of a write.
func readSeq(mp *ebpf.Map) (uint64, error) {
	var v bpf.AegisSweepSeqValue
	if err := mp.LookupWithFlags(unsafe.Pointer(&seqKey), unsafe.Pointer(&v), ebpf.LookupLock); err != nil {
		return 0, fmt.Errorf("read sweep sequence: %w", err)
	}
	return v.Seq, nil
}

// writeSeq sets the sweep sequence; only the holder of the exclusive sweep
// lock calls it.
func writeSeq(mp *ebpf.Map, seq uint64) error {
	v := bpf.AegisSweepSeqValue{Seq: seq}
	if err := mp.Update(unsafe.Pointer(&seqKey), unsafe.Pointer(&v), ebpf.UpdateLock); err != nil {
		return fmt.Errorf("write sweep sequence: %w", err)
	}
	return nil
}

// keyLocks serialize this process's writers of one key (grants, revokes,
// moves), so that a grant's repair never lands after a revoke of its key
// that started after the grant: see sweep.go. Striped: two keys may share
// a lock, which only costs them waiting for each other.
var (
	keyLocks [256]sync.Mutex
	keySeed  = maphash.MakeSeed()
)

func lockKey(k Key) *sync.Mutex {
	mu := &keyLocks[maphash.Comparable(keySeed, k)%uint64(len(keyLocks))]
	mu.Lock()
	return mu
}

// guardStats count what the write protocol did, for tests.
type guardStats struct {
	overlaps atomic.Uint64 // writes that overlapped a sweep section
	repaired atomic.Uint64 // of those, writes a sweep had deleted, written again
	keptDead atomic.Uint64 // revokes that found no room for a tombstone (tomb.go)
}

// guarded runs write, which writes the session of key k and returns the
// value it left in the map, such that no sweep deletes that value unseen
// (ordered). It holds k's lock throughout, so no revoke of k by this
// process runs in between. When guarded returns nil the value is in the
// map (or a newer one of k is).
//
// A write that returns an error must have written nothing.
func (m *Maps) guarded(k Key, write func() (*bpf.AegisSessionValue, error)) error {
	if err := m.markSession(k); err != nil {
		return err
	}
	defer lockKey(k).Unlock()
	var v *bpf.AegisSessionValue
	return m.ordered("session "+k.String(),
		func() (err error) { v, err = write(); return err },
		func() (bool, error) { return m.putBack(k, v) })
}

// ordered runs write so that no sweep section deletes what it wrote
// unseen: it reads the sweep sequence before and after, and when a section
// may have overlapped the write it waits for the section to end (or for
// its holder to die, which releases the lock) and calls restore, which
// puts back what the section deleted and reports whether it wrote. The
// sessions, their tombstones and a restore's batches are all written so;
// sweep.go holds the argument.
func (m *Maps) ordered(what string, write func() error, restore func() (bool, error)) error {
	before, err := readSeq(m.SweepSeq)
	if err != nil {
		return err
	}
	if err := write(); err != nil {
		return err
	}
	after, err := readSeq(m.SweepSeq)
	if err != nil {
		return err
	}
	if before == after && before%2 == 0 {
		return nil
	}
	m.stats.overlaps.Add(1)
	l, err := m.lockSweep(false)
	if err != nil {
		return fmt.Errorf("check %s after a sweep: %w", what, err)
	}
	defer l.Unlock()
	wrote, err := restore()
	if wrote {
		m.stats.repaired.Add(1)
	}
	return err
}

// putBack writes v under k unless k holds a value, which is v or newer:
// what a sweep section that overlapped a write deleted. It reports whether
// it wrote.
func (m *Maps) putBack(k Key, v *bpf.AegisSessionValue) (bool, error) {
	err := m.update(k, v, ebpf.UpdateNoExist)
	if errors.Is(err, ebpf.ErrKeyExist) {
		return false, nil
	}
	return err == nil, updateError(err)
}

// update writes v under k with the given flags and returns the library's
// error as is.
func (m *Maps) update(k Key, v *bpf.AegisSessionValue, flags ebpf.MapUpdateFlags) error {
	mp, kk := keyed(k, m.SessionsV4, m.SessionsV6)
	return mp.Update(kk, v, flags)
}

// keyed is the map of k's family, of m4 and m6 (sessions or tombstones,
// which share the key), and k in that map's key layout.
func keyed(k Key, m4, m6 *ebpf.Map) (*ebpf.Map, any) {
	if k.Is4() {
		kk := k.v4()
		return m4, &kk
	}
	kk := k.v6()
	return m6, &kk
}
