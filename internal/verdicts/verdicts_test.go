package verdicts_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/internal/verdicts"
)

var svc = netip.MustParseAddr("198.51.100.10")

// dataPath loads the program with its own maps, drop and pass events at
// rates no test exhausts, and a hub reading its ring buffer.
func dataPath(t *testing.T, opts verdicts.Options) (*ebpf.Program, *verdicts.Hub) {
	t.Helper()
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	cfg := state.Config{DefaultIdleTimeout: time.Hour, EventDropRate: 65535, EventPassRate: 65535}
	v, err := cfg.Value()
	if err != nil {
		t.Fatal(err)
	}
	if err := objs.Config.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	h, err := verdicts.NewHub(objs.Events, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return objs.AegisXdp, h
}

func knock(t *testing.T, prog *ebpf.Program, src netip.Addr, port uint16) {
	t.Helper()
	f := tu.Frame{Src: src, Dst: svc, Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: port}
	ret, err := prog.Run(&ebpf.RunOptions{Data: f.Bytes()})
	if err != nil {
		t.Fatal(err)
	}
	if bpf.Action(ret) != bpf.XDPDrop {
		t.Fatalf("action %d, want drop", ret)
	}
}

func src(i int) netip.Addr { return netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}) }

func recv(t *testing.T, w *verdicts.Watcher) verdicts.Event {
	t.Helper()
	select {
	case e, ok := <-w.C():
		if !ok {
			t.Fatal("watcher closed")
		}
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5 s")
	}
	panic("unreachable")
}

// A watcher that reads gets every event, in order, with the frame's tuple;
// one that never reads loses all but its buffer, counted, and holds up
// nobody.
func TestSlowWatcherLosesOnlyItsOwn(t *testing.T) {
	prog, h := dataPath(t, verdicts.Options{Buffer: 4})
	fast, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	slow, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	before := time.Now().Add(-time.Second)
	for i := range n {
		knock(t, prog, src(i), 8080)
		e := recv(t, fast)
		if e.Src != src(i) || e.Dst != svc || e.Sport != 40000 || e.Dport != 8080 || e.Proto != 6 ||
			e.Cause != bpf.ReasonNoSession || e.Action != bpf.XDPDrop || e.Enforced() != "drop" {
			t.Fatalf("event %d: %+v", i, e)
		}
		if e.Time.Before(before) || e.Time.After(time.Now().Add(time.Second)) {
			t.Fatalf("event %d at %v, now %v", i, e.Time, time.Now())
		}
	}
	if got := slow.Lost(); got != n-4 {
		t.Fatalf("slow watcher lost %d, want %d", got, n-4)
	}
	if fast.Lost() != 0 {
		t.Fatalf("fast watcher lost %d", fast.Lost())
	}
	for i := range 4 {
		if e := recv(t, slow); e.Src != src(i) {
			t.Fatalf("slow watcher's event %d from %v", i, e.Src)
		}
	}
}

// The history answers --last and --since, filtered, and joins the live
// stream without a gap or a repeat.
func TestHistoryThenLive(t *testing.T) {
	prog, h := dataPath(t, verdicts.Options{History: 32})
	probe, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		knock(t, prog, src(i), uint16(1000+i%2))
		recv(t, probe)
	}
	probe.Close()
	w, backlog, err := h.Watch(verdicts.Filter{Port: 1001}, time.Time{}, 5)
	if err != nil {
		t.Fatal(err)
	}
	if len(backlog) != 5 {
		t.Fatalf("backlog of %d, want 5", len(backlog))
	}
	for i, e := range backlog {
		if want := src(41 + 2*i); e.Src != want || e.Dport != 1001 {
			t.Fatalf("backlog %d: %v:%d, want %v:1001", i, e.Src, e.Dport, want)
		}
	}
	_, all, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 32 || all[0].Src != src(18) || all[31].Src != src(49) {
		t.Fatalf("history holds %d events, from %v to %v; want the last 32", len(all), all[0].Src, all[len(all)-1].Src)
	}
	if _, recent, _ := h.Watch(verdicts.Filter{}, time.Now().Add(time.Minute), 0); len(recent) != 0 {
		t.Fatalf("%d events newer than a minute from now", len(recent))
	}
	knock(t, prog, src(77), 1001)
	if e := recv(t, w); e.Src != src(77) {
		t.Fatalf("live event from %v", e.Src)
	}
}

func TestWatcherCap(t *testing.T) {
	_, h := dataPath(t, verdicts.Options{Watchers: 2})
	a, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0); !errors.Is(err, verdicts.ErrTooManyWatchers) {
		t.Fatalf("third watcher: %v, want ErrTooManyWatchers", err)
	}
	a.Close()
	if _, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0); err != nil {
		t.Fatalf("after a close: %v", err)
	}
}

func TestFilterMatch(t *testing.T) {
	e := verdicts.Event{
		Src: netip.MustParseAddr("203.0.113.9"), Dst: svc, Sport: 40000, Dport: 22, Proto: 6,
		Reason: bpf.ReasonMonitor, Cause: bpf.ReasonNoSession, Action: bpf.XDPPass,
	}
	for _, c := range []struct {
		f    verdicts.Filter
		want bool
	}{
		{verdicts.Filter{}, true},
		{verdicts.Filter{Verdict: "drop"}, true}, // what enforcement would do
		{verdicts.Filter{Verdict: "pass"}, false},
		{verdicts.Filter{Reasons: []bpf.Reason{bpf.ReasonMonitor}}, true},
		{verdicts.Filter{Reasons: []bpf.Reason{bpf.ReasonNoSession}}, true},
		{verdicts.Filter{Reasons: []bpf.Reason{bpf.ReasonExpired}}, false},
		{verdicts.Filter{Src: netip.MustParsePrefix("203.0.113.0/24")}, true},
		{verdicts.Filter{Src: netip.MustParsePrefix("192.0.2.0/24")}, false},
		{verdicts.Filter{Src: netip.MustParsePrefix("2001:db8::/32")}, false},
		{verdicts.Filter{Dst: netip.MustParsePrefix("198.51.100.10/32")}, true},
		{verdicts.Filter{Port: 22}, true},
		{verdicts.Filter{Port: 40000}, true},
		{verdicts.Filter{Port: 23}, false},
		{verdicts.Filter{Proto: 17}, false},
		{verdicts.Filter{Proto: 6, Port: 22, Verdict: "drop"}, true},
	} {
		if got := c.f.Match(&e); got != c.want {
			t.Errorf("%+v: %v, want %v", c.f, got, c.want)
		}
	}
	if err := (&verdicts.Filter{Verdict: "maybe"}).Validate(); !errors.Is(err, verdicts.ErrInvalidFilter) {
		t.Fatalf("verdict maybe: %v", err)
	}
	// A frame that was not IP has no addresses: a prefix filter never
	// matches it.
	if (&verdicts.Filter{Src: netip.MustParsePrefix("0.0.0.0/0")}).Match(&verdicts.Event{}) {
		t.Fatal("an address-less event matched a prefix")
	}
}

// The reader needs a writable descriptor: a read-only one cannot map the
// consumer position for writing. That is why the loader pins the ring
// buffer group-writable and the daemons open it writable.
func TestReaderNeedsWritableMap(t *testing.T) {
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(spec.Maps[state.MapEvents])
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	dir, err := os.MkdirTemp("/sys/fs/bpf", "aegis-verdicts-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, state.MapEvents)
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
	ro, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := verdicts.NewHub(ro, verdicts.Options{}); err == nil {
		t.Fatal("a reader opened on a read-only descriptor")
	}
	rw, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	h, err := verdicts.NewHub(rw, verdicts.Options{})
	if err != nil {
		t.Fatalf("writable descriptor: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := h.Run(ctx); err != nil {
		t.Fatal(err)
	}
}

// A second data path, its own maps and ring buffer, as a full unload and
// a new load leave: Switch moves the hub to its events map. What the old
// ring still held is delivered first, then the new one's events; the
// watcher's subscription, filter and channel stay the same.
func TestSwitchFollowsANewEventsMap(t *testing.T) {
	old, h := dataPath(t, verdicts.Options{})
	w, _, err := h.Watch(verdicts.Filter{}, time.Time{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	knock(t, old, src(1), 1001)
	if e := recv(t, w); e.Dport != 1001 {
		t.Fatalf("event %+v", e)
	}

	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	cfg := state.Config{DefaultIdleTimeout: time.Hour, EventDropRate: 65535}
	v, err := cfg.Value()
	if err != nil {
		t.Fatal(err)
	}
	if err := objs.Config.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	before := h.Source()
	knock(t, old, src(2), 1002) // still in the old ring when the switch comes
	knock(t, objs.AegisXdp, src(3), 1003)
	if err := h.Switch(objs.Events); err != nil {
		t.Fatal(err)
	}
	want, err := state.MapIDOf(objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	if h.Source() != want || want == before {
		t.Fatalf("source %d after the switch, want %d (was %d)", h.Source(), want, before)
	}
	for _, port := range []uint16{1002, 1003} {
		if e := recv(t, w); e.Dport != port {
			t.Fatalf("event to %d, want %d", e.Dport, port)
		}
	}
	knock(t, objs.AegisXdp, src(4), 1004)
	knock(t, old, src(5), 1005) // the old map is no longer read
	knock(t, objs.AegisXdp, src(6), 1006)
	for _, port := range []uint16{1004, 1006} {
		if e := recv(t, w); e.Dport != port {
			t.Fatalf("event to %d, want %d", e.Dport, port)
		}
	}
}
