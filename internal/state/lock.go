package state

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Lock is a flock on the pin directory. Writers (the loader) hold it
// exclusively for a whole load, upgrade or unload; readers hold it shared
// while they open the pins, so that they never see a half-written state.
type Lock struct{ f *os.File }

// LockDir takes a flock on dir, exclusive or shared, waiting for it.
func LockDir(dir string, exclusive bool) (*Lock, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	return LockOpenDir(f, exclusive)
}

// LockOpenDir is LockDir on a directory the caller opened itself (the
// loader opens it without following symlinks). The lock owns f: Unlock
// closes it, and so does a failure.
func LockOpenDir(f *os.File, exclusive bool) (*Lock, error) {
	var err error
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return &Lock{f: f}, nil
}

// TryLockDir is LockDir without waiting; it returns ok=false when another
// process holds a conflicting lock.
func TryLockDir(dir string, exclusive bool) (l *Lock, ok bool, err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, false, err
	}
	how := unix.LOCK_SH | unix.LOCK_NB
	if exclusive {
		how = unix.LOCK_EX | unix.LOCK_NB
	}
	if err := unix.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock %s: %w", dir, err)
	}
	return &Lock{f: f}, true, nil
}

// File returns the locked directory, for callers that must check that it is
// still the one at its path.
func (l *Lock) File() *os.File { return l.f }

// Unlock releases the lock.
func (l *Lock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last fd releases the flock
	l.f = nil
	return err
}
