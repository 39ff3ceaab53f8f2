package state

import (
	"time"

	"golang.org/x/sys/unix"
)

// Now returns the data path's clock: CLOCK_MONOTONIC_COARSE in nanoseconds,
// the clock of every timestamp in the sessions maps (see bpf/aegis.c).
func Now() uint64 {
	var ts unix.Timespec
	// Cannot fail for a valid clock id and a valid pointer.
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts)
	return uint64(ts.Nano())
}

// Tick is the coarse clock's resolution, one scheduler tick: a stamp the
// data path writes may lag Now by up to this much, never lead it (it keeps
// the clock's value for the tick it read it in; see clock_now in
// bpf/aegis.c).
func Tick() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGetres(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil || ts.Nano() <= 0 {
		return 10 * time.Millisecond // HZ=100, the coarsest tick Linux has
	}
	return time.Duration(ts.Nano())
}

// WallTime converts a data-path timestamp to wall-clock time.
func WallTime(stamp uint64) time.Time {
	return time.Now().Add(-time.Duration(int64(Now() - stamp)))
}
