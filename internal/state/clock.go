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

// WallTime converts a data-path timestamp to wall-clock time.
func WallTime(stamp uint64) time.Time {
	return time.Now().Add(-time.Duration(int64(Now() - stamp)))
}
