package store_test

import (
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/store"
)

// Just after a boot the data path's clock reads a few seconds. A session
// last seen an hour of wall time ago converts to a stamp "before zero",
// and the data path's own rule (bpf.SessionVerdict) finds it exactly an
// hour idle: live with a 2 h idle timeout, expired with a 59 min one.
func TestClockAcrossBoot(t *testing.T) {
	wall := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	mono := uint64(7 * time.Second) // seven seconds after the boot
	c := store.Clock{Wall: func() time.Time { return wall }, Mono: func() uint64 { return mono }}

	seen := wall.Add(-time.Hour).UnixNano()
	stamp := c.ToMono(seen)
	if stamp < mono {
		t.Fatalf("a stamp before the boot %d should wrap around, not be below now %d", stamp, mono)
	}
	if got := time.Duration(int64(mono - stamp)); got != time.Hour {
		t.Fatalf("age across the boot %v, want 1h", got)
	}
	v := bpf.AegisSessionValue{LastSeenNs: stamp, CreatedNs: stamp, IdleTimeoutNs: uint64(2 * time.Hour)}
	if r, _ := bpf.SessionVerdict(&v, 0, mono); r != bpf.ReasonSession {
		t.Errorf("2 h idle timeout, 1 h idle across the boot: %v, want session", r)
	}
	v.IdleTimeoutNs = uint64(59 * time.Minute)
	if r, _ := bpf.SessionVerdict(&v, 0, mono); r != bpf.ReasonExpired {
		t.Errorf("59 min idle timeout, 1 h idle across the boot: %v, want expired", r)
	}
	// And back: the wall time is what was stored.
	if got := c.ToWall(stamp); got != seen {
		t.Errorf("ToWall(ToMono(t)) = %d, want %d", got, seen)
	}
	// A lifetime that ends after the boot converts to a plain future stamp.
	end := c.ToMono(wall.Add(time.Minute).UnixNano())
	if end != mono+uint64(time.Minute) {
		t.Errorf("lifetime end %d, want %d", end, mono+uint64(time.Minute))
	}
}
