package bpf_test

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// limits returns the per-CPU buckets of a kind, and their sum.
func limits(t testing.TB, h *harness, k bpf.EventKind) ([]bpf.AegisEventLimit, bpf.AegisEventLimit) {
	t.Helper()
	var per []bpf.AegisEventLimit
	if err := h.objs.EventLimits.Lookup(uint32(k), &per); err != nil {
		t.Fatal(err)
	}
	var sum bpf.AegisEventLimit
	for _, l := range per {
		sum.Emitted += l.Emitted
		sum.Suppressed += l.Suppressed
		sum.Lost += l.Lost
	}
	return per, sum
}

// drain reads every event in the ring buffer.
func drain(t testing.TB, rd *ringbuf.Reader) []bpf.AegisEvent {
	t.Helper()
	var out []bpf.AegisEvent
	for {
		rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		e, err := bpf.DecodeEvent(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
}

func newEventHarness(t *testing.T, c state.Config) (*harness, *ringbuf.Reader) {
	h := newHarness(t)
	c.DefaultIdleTimeout = time.Hour
	h.setConfig(t, c)
	rd, err := ringbuf.NewReader(h.objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	return h, rd
}

// A flood of 100,000 dropped frames from many sources: every frame is
// either emitted, suppressed or lost, and no more are emitted than the
// buckets allow (a second's burst plus the rate over the run, per CPU).
// Passes with a pass rate of 0 emit nothing and count nowhere.
func TestEventFloodIsRateLimited(t *testing.T) {
	const rate, flood = 100, 100_000
	h, rd := newEventHarness(t, state.Config{EventDropRate: rate})
	now := state.Now()
	h.grant(t, state.Session{Key: state.Key{Src: client4, Dst: svc4, Port: 22, Proto: state.TCP},
		User: "alice", LastSeen: now, Created: now, IdleTimeout: time.Hour})

	start := time.Now()
	for i := range flood {
		src := netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
		if _, err := h.fib.Run(h.prog, tcp(src, svc4, uint16(1000+i%1000)).Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	for range 1000 {
		if _, err := h.fib.Run(h.prog, tcp(client4, svc4, 22).Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)

	_, drops := limits(t, h, bpf.EventKindDrop)
	if got := drops.Emitted + drops.Suppressed + drops.Lost; got != flood {
		t.Fatalf("emitted %d + suppressed %d + lost %d = %d, want %d", drops.Emitted, drops.Suppressed, drops.Lost, got, flood)
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	bound := uint64(float64(cpus) * rate * (1 + elapsed.Seconds() + 0.01))
	if drops.Emitted == 0 || drops.Emitted > bound {
		t.Fatalf("emitted %d events in %v on %d CPUs at %d/s, want 1..%d", drops.Emitted, elapsed, cpus, rate, bound)
	}
	if _, passes := limits(t, h, bpf.EventKindPass); passes != (bpf.AegisEventLimit{}) {
		t.Fatalf("passes with rate 0 counted %+v", passes)
	}
	evs := drain(t, rd)
	if uint64(len(evs)) != drops.Emitted {
		t.Fatalf("read %d events, emitted %d", len(evs), drops.Emitted)
	}
	for _, e := range evs {
		if bpf.Reason(e.Reason) != bpf.ReasonNoSession || e.Action != uint32(bpf.XDPDrop) || e.Dport < 1000 {
			t.Fatalf("unexpected event %+v", e)
		}
	}
	t.Logf("%d frames in %v: %d events, %d suppressed", flood, elapsed, drops.Emitted, drops.Suppressed)
}

// The program's limiter gives what the model's gives from the same bucket
// state. Buckets stamped in the future refill nothing, so the outcome does
// not depend on the clock; the thread is pinned so one bucket serves.
func TestEventLimiterMatchesModel(t *testing.T) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	future := state.Now() + uint64(time.Hour)
	for _, c := range []struct {
		name   string
		rate   uint16
		bucket bpf.AegisEventLimit
		want   int
	}{
		{"credit for five", 10, bpf.AegisEventLimit{Credit: 5e9, LastNs: future}, 5},
		{"credit capped at one second", 1, bpf.AegisEventLimit{Credit: 5e9, LastNs: future}, 1},
		{"just short of one", 10, bpf.AegisEventLimit{Credit: 1e9 - 1, LastNs: future}, 0},
		{"idle bucket fills to its burst", 10, bpf.AegisEventLimit{}, 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, rd := newEventHarness(t, state.Config{EventDropRate: c.rate})
			per := make([]bpf.AegisEventLimit, cpus)
			for i := range per {
				per[i] = c.bucket
			}
			if err := h.objs.EventLimits.Put(uint32(bpf.EventKindDrop), per); err != nil {
				t.Fatal(err)
			}
			h.fib.Thread.Do(func() {
				var set unix.CPUSet
				set.Set(0)
				err = unix.SchedSetaffinity(0, &set)
			})
			if err != nil {
				t.Fatal(err)
			}
			model := c.bucket
			admitted := 0
			const frames = 20
			for i := range frames {
				now := state.Now()
				if _, err := h.fib.Run(h.prog, tcp(other4, svc4, uint16(100+i)).Bytes()); err != nil {
					t.Fatal(err)
				}
				if model.Admit(uint64(c.rate), now) {
					admitted++
				}
			}
			got, _ := limits(t, h, bpf.EventKindDrop)
			if admitted != c.want {
				t.Fatalf("model admitted %d, want %d", admitted, c.want)
			}
			if got[0].Emitted != uint64(c.want) || got[0].Suppressed != uint64(frames-c.want) {
				t.Fatalf("program emitted %d and suppressed %d, model %d and %d", got[0].Emitted, got[0].Suppressed, c.want, frames-c.want)
			}
			if n := len(drain(t, rd)); n != c.want {
				t.Fatalf("read %d events, want %d", n, c.want)
			}
		})
	}
}

// Monitor mode: a would-be drop passes, counts as monitor, and its event
// says what enforcement would have done.
func TestMonitorEventSaysWouldDrop(t *testing.T) {
	h, rd := newEventHarness(t, state.Config{Monitor: true})
	f := tcp(other4, svc4, 8080)
	if _, err := h.fib.Run(h.prog, f.Bytes()); err != nil {
		t.Fatal(err)
	}
	evs := drain(t, rd)
	if len(evs) != 1 {
		t.Fatalf("%d events, want 1", len(evs))
	}
	e := evs[0]
	want := bpf.AegisEvent{
		TsNs: e.TsNs, Ifindex: h.fib.Ifindex, Len: uint32(len(f.Bytes())),
		Src: netip.AddrFrom16(other4.As16()).As16(), Dst: svc4.As16(),
		Sport: 40000, Dport: 8080, Proto: 6, Family: 4,
		Reason: uint8(bpf.ReasonMonitor), Cause: uint8(bpf.ReasonNoSession), Action: uint32(bpf.XDPPass),
	}
	copy(want.Src[:], other4.AsSlice())
	clear(want.Src[4:])
	copy(want.Dst[:], svc4.AsSlice())
	clear(want.Dst[4:])
	if e != want {
		t.Fatalf("event\n%+v\nwant\n%+v", e, want)
	}
}

// With the drop events turned off nothing is emitted and nothing counted.
func TestNoDropEvents(t *testing.T) {
	h, rd := newEventHarness(t, state.Config{NoDropEvents: true})
	for i := range 10 {
		if _, err := h.fib.Run(h.prog, tcp(other4, svc4, uint16(i+1)).Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	if _, s := limits(t, h, bpf.EventKindDrop); s != (bpf.AegisEventLimit{}) {
		t.Fatalf("counted %+v", s)
	}
	if n := len(drain(t, rd)); n != 0 {
		t.Fatalf("%d events", n)
	}
}
