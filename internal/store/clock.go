package store

import (
	"time"

	"github.com/aegis-agent/aegis/internal/state"
)

// Clock converts between the store's wall-clock times and the data path's
// monotonic ones, which start again at every boot. A wall time before
// this boot converts to a stamp "before zero", which wraps around as an
// unsigned number: the data path and every reader of the maps take the
// difference of two stamps modulo 2^64 (bpf.SessionVerdict), so a session
// last seen an hour before the boot is an hour and the uptime idle after
// it, exactly. That is how the time a gateway was down counts as idle
// time. (A lifetime that ended before the boot is never converted: the
// session is not restored.)
type Clock struct {
	// Wall and Mono read the two clocks; nil for time.Now and state.Now.
	Wall func() time.Time
	Mono func() uint64
}

func (c Clock) now() (wall int64, mono uint64) {
	w, m := time.Now, state.Now
	if c.Wall != nil {
		w = c.Wall
	}
	if c.Mono != nil {
		m = c.Mono
	}
	// Read back to back, so that the pair is one instant to within the
	// coarse clock's tick; read again if a preemption came between.
	for range 3 {
		mono = m()
		wall = w().UnixNano()
		if m()-mono <= uint64(time.Millisecond) {
			break
		}
	}
	return wall, mono
}

// ToMono converts a wall time (Unix nanoseconds) to the data path's clock.
func (c Clock) ToMono(wall int64) uint64 { return c.Pair().ToMono(wall) }

// ToWall converts a data-path stamp to a wall time (Unix nanoseconds).
func (c Clock) ToWall(mono uint64) int64 { return c.Pair().ToWall(mono) }

// Pair reads both clocks once. What converts is their offset, which does
// not drift while both run, so one Pair converts all the stamps of a walk
// of the maps or of a snapshot: reading the data path's clock is a system
// call, and a million sessions would otherwise make millions.
func (c Clock) Pair() Pair {
	w, m := c.now()
	return Pair{wall: w, mono: m}
}

// Pair is one reading of the wall and the data path's clock (Clock.Pair).
type Pair struct {
	wall int64
	mono uint64
}

// Wall is the wall time of the reading, Unix nanoseconds.
func (p Pair) Wall() int64 { return p.wall }

// ToMono converts a wall time (Unix nanoseconds) to the data path's clock.
func (p Pair) ToMono(wall int64) uint64 { return p.mono + uint64(wall-p.wall) }

// ToWall converts a data-path stamp to a wall time (Unix nanoseconds).
func (p Pair) ToWall(mono uint64) int64 { return p.wall + int64(mono-p.mono) }

// NowWall is the clock's wall time, Unix nanoseconds.
func (c Clock) NowWall() int64 {
	w, _ := c.now()
	return w
}
