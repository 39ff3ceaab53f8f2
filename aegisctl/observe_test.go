package aegisctl_test

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// knocker loads the XDP program on the env's pins with drop events on
// and returns a function that runs a TCP frame through it.
func (e *env) knocker(t *testing.T) func(src string, port uint16) {
	t.Helper()
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	m, err := state.Open(e.pin, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: m.ByName()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	config, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, state.MapConfig), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer config.Close()
	v, err := (&state.Config{DefaultIdleTimeout: time.Minute, EventDropRate: 1000}).Value()
	if err != nil {
		t.Fatal(err)
	}
	if err := config.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return func(src string, port uint16) {
		f := tu.Frame{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr("198.51.100.10"), Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: port}
		if _, err := objs.AegisXdp.Run(&ebpf.RunOptions{Data: f.Bytes()}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestObserveAndTop(t *testing.T) {
	e := newEnv(t)
	knock := e.knocker(t)
	for range 3 {
		knock("203.0.113.9", 22)
	}
	knock("203.0.113.10", 80)

	// The control plane starts reading at the first watcher; the events
	// already in the ring buffer reach its history within moments.
	var lines []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		out := mustRun(t, e.cmd("observe", "--json", "--last", "10", "--no-follow")...)
		if lines = strings.Split(strings.TrimSpace(out), "\n"); len(lines) == 4 {
			break
		}
	}
	if len(lines) != 4 {
		t.Fatalf("observe: %d lines, want 4:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	var ev aegisctl.ObservedEvent
	if err := json.Unmarshal([]byte(lines[3]), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Source != "203.0.113.10" || ev.SourcePort != 40000 || ev.Destination != "198.51.100.10" || ev.DestPort != 80 ||
		ev.Protocol != "tcp" || ev.Verdict != "drop" || ev.Reason != "no_session" {
		t.Fatalf("last event %+v", ev)
	}

	table := mustRun(t, e.cmd("observe", "--last", "10", "--no-follow", "--from", "203.0.113.10")...)
	if !strings.Contains(table, "203.0.113.10:40000") || !strings.Contains(table, "198.51.100.10:80") ||
		!strings.Contains(table, "no_session") || strings.Contains(table, "203.0.113.9:") {
		t.Fatalf("filtered table:\n%s", table)
	}

	var top aegisctl.Top
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("top", "--json")...)), &top); err != nil {
		t.Fatal(err)
	}
	if top.Events != 4 || len(top.Sources) != 2 || top.Sources[0] != (aegisctl.TopRow{Key: "203.0.113.9", Events: 3}) ||
		top.Ports[0] != (aegisctl.TopRow{Key: "22/tcp", Events: 3}) {
		t.Fatalf("top %+v", top)
	}
	if out := mustRun(t, e.cmd("top")...); !strings.Contains(out, "203.0.113.9") || !strings.Contains(out, "22/tcp") {
		t.Fatalf("top table:\n%s", out)
	}
	if r := run(e.cmd("observe", "--protocol", "nonsense", "--no-follow")...); r.code == 0 {
		t.Fatal("observe accepted --protocol nonsense")
	}
}

// local explain reads the pins and names the session that passes a flow,
// or says why one drops; it moves no counter.
func TestLocalExplain(t *testing.T) {
	e := newEnv(t)
	mustRun(t, e.cmd("login", "--user", "alice", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "8080", "--idle-timeout", "5m")...)
	m := e.maps(t)
	before, err := m.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	out := mustRun(t, "local", "explain", "--pin-path", e.pin, "192.0.2.10", "198.51.100.10", "8080")
	if !strings.Contains(out, "verdict  pass: session") || !strings.Contains(out, `session of user "alice" (tcp)`) ||
		!strings.Contains(out, "idle left 5m0s") {
		t.Fatalf("explain of a session:\n%s", out)
	}
	// Over gRPC the control plane says the same.
	// (The idle time left may tick between the two: compare up to it.)
	upTo := func(s string) string { return s[:strings.Index(s, "idle left")] }
	if remote := mustRun(t, e.cmd("explain", "192.0.2.10", "198.51.100.10", "8080")...); upTo(remote) != upTo(out) {
		t.Fatalf("explain over gRPC:\n%s\nlocal explain:\n%s", remote, out)
	}
	var ex aegisctl.Explanation
	if err := json.Unmarshal([]byte(mustRun(t, "local", "explain", "--pin-path", e.pin, "--json", "192.0.2.10", "198.51.100.10", "8080", "udp")), &ex); err != nil {
		t.Fatal(err)
	}
	if ex.Action != "drop" || ex.Verdict != "drop" || ex.Reason != "no_session" || ex.Flow != "udp 192.0.2.10:40000 -> 198.51.100.10:8080" {
		t.Fatalf("explain of UDP: %+v", ex)
	}
	// The control plane's answer carries the verdict itself.
	var remote aegisctl.Explanation
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("explain", "--json", "192.0.2.10", "198.51.100.10", "8080", "udp")...)), &remote); err != nil {
		t.Fatal(err)
	}
	if remote != ex {
		t.Fatalf("explain --json over gRPC %+v, local %+v", remote, ex)
	}
	after, err := m.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	if before != after {
		t.Fatal("explain moved counters")
	}
	if r := run("local", "explain", "--pin-path", e.pin, "192.0.2.10", "2001:db8::1", "80"); r.code == 0 {
		t.Fatal("explain accepted addresses of two families")
	}
}
