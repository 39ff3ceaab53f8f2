package reaper_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
	"github.com/aegis-agent/aegis/reaper"
)

// controlPlaneEnv makes the test binary act as the control plane's writer
// (see controlPlane) instead of running tests.
const controlPlaneEnv = "AEGIS_REAPER_TEST_CONTROL_PLANE"

func TestMain(m *testing.M) {
	if pin := os.Getenv(controlPlaneEnv); pin != "" {
		os.Exit(controlPlane(pin))
	}
	os.Exit(m.Run())
}

// env is a network namespace with a veth pair and a pin directory where
// the real loader loads the data path.
type env struct {
	t   *testing.T
	ns  *tu.Netns
	pin string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, ns: tu.NewNetns(t, "aegis-rp-"), pin: tu.PinDir(t)}
	e.ns.AddVeth(t, "a0", "a1")
	e.load()
	return e
}

// loader runs aegis-loader in-process in the namespace.
func (e *env) loader(args ...string) {
	e.t.Helper()
	var out bytes.Buffer
	var code int
	if err := e.ns.Do(func() error {
		code = loader.Main(context.Background(), append(args, "--pin-path", e.pin, "--log-format", "json"),
			cli.IO{Stdout: &out, Stderr: &out})
		return nil
	}); err != nil || code != 0 {
		e.t.Fatalf("aegis-loader %s: exit %d %v\n%s", strings.Join(args, " "), code, err, out.String())
	}
}

// load loads with a 10s default idle timeout.
func (e *env) load() { e.loader("load", "-i", "a0", "--group", "root", "-r", "10s") }

func (e *env) maps() *state.Maps {
	e.t.Helper()
	m, err := state.Open(e.pin, state.OpenOptions{Writable: true})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	return m
}

// once runs "aegis-reaper --once" in-process.
func (e *env) once(args ...string) (int, *tu.Buffer) {
	var log tu.Buffer
	code := reaper.Main(context.Background(),
		append([]string{"--once", "--pin-path", e.pin, "--log-format", "json"}, args...),
		cli.IO{Stdout: &log, Stderr: &log})
	return code, &log
}

// daemon runs aegis-reaper in-process until the returned stop is called,
// which returns its exit code.
func (e *env) daemon(args ...string) (*tu.Buffer, func() int) {
	log := &tu.Buffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- reaper.Main(ctx, append([]string{"--pin-path", e.pin, "--log-format", "json"}, args...),
			cli.IO{Stdout: log, Stderr: log})
	}()
	var once sync.Once
	code := -1
	stop := func() int {
		once.Do(func() {
			cancel()
			select {
			case code = <-done:
			case <-time.After(10 * time.Second):
				e.t.Fatal("aegis-reaper did not stop within 10s")
			}
		})
		return code
	}
	e.t.Cleanup(func() { stop() })
	return log, stop
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var (
	alice = netip.MustParseAddr("192.0.2.10")
	bob   = netip.MustParseAddr("2001:db8:1::10")
	svc4  = netip.MustParseAddr("198.51.100.10")
	svc6  = netip.MustParseAddr("2001:db8:2::10")
)

func grant(t *testing.T, m *state.Maps, s state.Session) {
	t.Helper()
	if s.Created == 0 {
		s.Created = s.LastSeen
	}
	if err := m.Grant(s); err != nil {
		t.Fatal(err)
	}
}

func has(t *testing.T, m *state.Maps, k state.Key) bool {
	t.Helper()
	_, err := m.Lookup(k)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func TestOnceWithoutMaps(t *testing.T) {
	tu.RequireKernel(t)
	var out bytes.Buffer
	code := reaper.Main(context.Background(), []string{"--once", "--pin-path", tu.PinDir(t)},
		cli.IO{Stdout: &out, Stderr: &out})
	if code != 1 {
		t.Fatalf("exit %d, want 1\n%s", code, out.String())
	}
	got := strings.TrimSpace(out.String())
	if strings.Count(got, "\n") != 0 || !strings.Contains(got, "not loaded") || !strings.Contains(got, "aegis-loader load") {
		t.Fatalf("want one line naming the problem and the fix, got:\n%s", got)
	}
}

func TestUsage(t *testing.T) {
	var out bytes.Buffer
	if code := reaper.Main(context.Background(), []string{"--cleanup-interval", "0s"}, cli.IO{Stdout: &out, Stderr: &out}); code != 2 {
		t.Fatalf("--cleanup-interval 0s: exit %d, want 2\n%s", code, out.String())
	}
}

// --once judges each session with its own idle timeout, the config map's
// default (10s here) or its lifetime, and logs one line per reaped session.
func TestOnceReapsExpiredSessions(t *testing.T) {
	e := newEnv(t)
	m := e.maps()
	now := state.Now()
	ago := func(d time.Duration) uint64 { return now - uint64(d) }
	type tc struct {
		s      state.Session
		reason string // "" for kept
	}
	cases := []tc{
		{state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 22, Proto: state.TCP}, User: "idle-own", LastSeen: ago(3 * time.Second), IdleTimeout: time.Second}, "idle"},
		{state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 23, Proto: state.TCP}, User: "idle-default", LastSeen: ago(11 * time.Second)}, "idle"},
		{state.Session{Key: state.Key{Src: bob, Dst: svc6, Port: 53, Proto: state.UDP}, User: "lifetime", LastSeen: now, IdleTimeout: time.Hour, Expires: ago(time.Second)}, "lifetime"},
		{state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 24, Proto: state.TCP}, User: "within-default", LastSeen: ago(5 * time.Second)}, ""},
		{state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 25, Proto: state.UDP}, User: "own-beats-default", LastSeen: ago(30 * time.Second), IdleTimeout: time.Minute}, ""},
		{state.Session{Key: state.Key{Src: bob, Dst: svc6, Port: 443, Proto: state.TCP}, User: "live", LastSeen: now, IdleTimeout: time.Hour, Expires: now + uint64(time.Hour)}, ""},
	}
	for _, c := range cases {
		grant(t, m, c.s)
	}
	code, log := e.once()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, log)
	}
	lines := log.JSONLines(t, "reaped session")
	byUser := map[string]map[string]any{}
	for _, l := range lines {
		byUser[fmt.Sprint(l["user"])] = l
	}
	for _, c := range cases {
		l, logged := byUser[c.s.User]
		if got := has(t, m, c.s.Key); got != (c.reason == "") {
			t.Errorf("%s: present=%v after the sweep", c.s.User, got)
		}
		// A reaped session leaves its tombstone, so that its service
		// opens no flow back to the user.
		if tb, err := m.LookupTomb(c.s.Key); (err == nil) != (c.reason != "") || (err == nil && tb.Cause != state.TombExpired) {
			t.Errorf("%s: tombstone %+v %v after the sweep", c.s.User, tb, err)
		}
		if logged != (c.reason != "") {
			t.Errorf("%s: logged=%v", c.s.User, logged)
			continue
		}
		if !logged {
			continue
		}
		if l["level"] != "info" || l["reason"] != c.reason || l["proto"] != c.s.Proto.String() ||
			l["src"] != c.s.Src.String() || l["dst"] != c.s.Dst.String() || l["dport"] != float64(c.s.Port) {
			t.Errorf("%s: log line %v", c.s.User, l)
		}
		idle, err := time.ParseDuration(fmt.Sprint(l["idle"]))
		if err != nil || idle < time.Duration(now-c.s.LastSeen) {
			t.Errorf("%s: idle %v, want at least %v", c.s.User, l["idle"], time.Duration(now-c.s.LastSeen))
		}
	}
	if len(lines) != 3 {
		t.Errorf("%d reaped lines, want 3:\n%s", len(lines), log)
	}
	// The summary is at debug: absent at the default level, present with
	// --log-level debug.
	if n := len(log.JSONLines(t, "sweep")); n != 0 {
		t.Errorf("%d summaries at info level", n)
	}
	code, log = e.once("--log-level", "debug")
	sum := log.JSONLines(t, "sweep")
	if code != 0 || len(sum) != 1 || sum[0]["scanned_v4"] != float64(2) || sum[0]["scanned_v6"] != float64(1) ||
		sum[0]["reaped_idle"] != float64(0) || sum[0]["complete"] != true {
		t.Errorf("second sweep: exit %d, summary %v\n%s", code, sum, log)
	}
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// metric returns the value of one series in a scrape, or -1.
func metric(body, series string) float64 {
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err == nil {
				return v
			}
		}
	}
	return -1
}

// The daemon sweeps on its interval, exports its metrics, and follows the
// loader through an unload and a new load.
func TestDaemonSweepsAndFollowsTheLoader(t *testing.T) {
	e := newEnv(t)
	m := e.maps()
	addr := freeAddr(t)
	log, stop := e.daemon("--cleanup-interval", "50ms", "--metrics-address", addr)

	now := state.Now()
	idle := state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 22, Proto: state.TCP}, User: "alice",
		LastSeen: now - uint64(time.Minute), IdleTimeout: time.Second}
	over := state.Session{Key: state.Key{Src: bob, Dst: svc6, Port: 22, Proto: state.TCP}, User: "bob",
		LastSeen: now, IdleTimeout: time.Hour, Expires: now - 1}
	live := state.Session{Key: state.Key{Src: alice, Dst: svc4, Port: 443, Proto: state.TCP}, User: "carol",
		LastSeen: now, IdleTimeout: time.Hour}
	for _, s := range []state.Session{idle, over, live} {
		grant(t, m, s)
	}
	waitFor(t, "both expired sessions reaped", func() bool { return !has(t, m, idle.Key) && !has(t, m, over.Key) })
	if !has(t, m, live.Key) {
		t.Fatal("live session reaped")
	}

	waitFor(t, "the reaps counted", func() bool {
		b := scrape(t, addr)
		return metric(b, `aegis_reaper_sessions_reaped_total{family="ipv4",reason="idle"}`) >= 1 &&
			metric(b, `aegis_reaper_sessions_reaped_total{family="ipv6",reason="lifetime"}`) >= 1
	})
	body := scrape(t, addr)
	for series, want := range map[string]float64{
		`aegis_reaper_sessions_reaped_total{family="ipv4",reason="idle"}`:     1,
		`aegis_reaper_sessions_reaped_total{family="ipv6",reason="lifetime"}`: 1,
		`aegis_reaper_sessions_reaped_total{family="ipv4",reason="lifetime"}`: 0,
		`aegis_reaper_sessions_regranted_total{family="ipv4"}`:                0,
		`aegis_reaper_sweep_errors_total`:                                     0,
	} {
		if got := metric(body, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	for _, series := range []string{`aegis_reaper_sessions_scanned_total{family="ipv4"}`, `aegis_reaper_sweep_duration_seconds_count`,
		`aegis_reaper_last_sweep_timestamp_seconds`} {
		if got := metric(body, series); got <= 0 {
			t.Errorf("%s = %v, want > 0", series, got)
		}
	}
	for _, private := range []string{alice.String(), bob.String(), svc4.String(), "alice", "carol"} {
		if strings.Contains(body, private) {
			t.Errorf("metrics mention %q", private)
		}
	}

	// Unload: the daemon waits for the loader, and keeps serving.
	e.loader("unload")
	waitFor(t, "the daemon to notice the unload", func() bool { return len(log.JSONLines(t, "no sessions maps to sweep; waiting for aegis-loader")) == 1 })
	// A new load brings new maps; the daemon sweeps those.
	e.load()
	m2 := e.maps()
	grant(t, m2, idle)
	waitFor(t, "the session in the new maps reaped", func() bool { return !has(t, m2, idle.Key) })
	// The sweep deletes before it logs and counts: wait for those too.
	waitFor(t, "the log line about the maps coming back", func() bool {
		return len(log.JSONLines(t, "sessions maps are pinned again; sweeping")) > 0
	})
	waitFor(t, "the reload's reap counted", func() bool {
		return metric(scrape(t, addr), `aegis_reaper_sessions_reaped_total{family="ipv4",reason="idle"}`) >= 2
	})
	if n := len(log.JSONLines(t, "sessions maps are pinned again; sweeping")); n != 1 {
		t.Errorf("%d lines about the maps coming back", n)
	}
	if n := metric(scrape(t, addr), `aegis_reaper_sessions_reaped_total{family="ipv4",reason="idle"}`); n != 2 {
		t.Errorf("reaped ipv4 idle = %v after the reload, want 2", n)
	}
	if code := stop(); code != 0 {
		t.Fatalf("exit %d on stop\n%s", code, log)
	}
	if len(log.JSONLines(t, "reaper stopped")) != 1 {
		t.Errorf("no clean stop logged\n%s", log)
	}
}

// cpKeys is the key space the simulated control plane works on.
func cpKey(i int) state.Key {
	if i%2 == 0 {
		return state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 8)}), Port: 8080, Proto: state.TCP}
	}
	return state.Key{Src: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 14: byte(i >> 8), 15: byte(i)}), Dst: svc6, Port: 8080, Proto: state.UDP}
}

const cpKeys = 1000

// cpOp is the simulated control plane's last acknowledged operation on a
// key.
type cpOp struct {
	Op   string // "live", "short" or "revoked"
	User string
}

// controlPlane stands in for aegis-controlplane, which is built
// separately: a second process that opens the pinned maps through the
// contract package and, for a second, cycles each key through a short
// grant (2 ms of idle timeout, expired by the next round), a live grant
// over the expired one (an hour), and a revoke. It prints each key's last
// acknowledged operation as JSON, and fails if a revoke finds its live
// grant gone.
func controlPlane(pin string) int {
	m, err := state.Open(pin, state.OpenOptions{Writable: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer m.Close()
	last := make([]cpOp, cpKeys)
	deadline := time.Now().Add(time.Second)
	for round := 0; time.Now().Before(deadline); round++ {
		for i := range last {
			k := cpKey(i)
			now := state.Now()
			var err error
			switch (i + round) % 3 {
			case 0:
				u := fmt.Sprintf("short-%d", round)
				err = m.Grant(state.Session{Key: k, User: u, LastSeen: now, Created: now, IdleTimeout: 2 * time.Millisecond})
				last[i] = cpOp{"short", u}
			case 1:
				u := fmt.Sprintf("live-%d", round)
				err = m.Grant(state.Session{Key: k, User: u, LastSeen: now, Created: now, IdleTimeout: time.Hour})
				last[i] = cpOp{"live", u}
			case 2:
				if err = m.Revoke(k); errors.Is(err, state.ErrNotFound) {
					if last[i].Op == "live" {
						fmt.Fprintf(os.Stderr, "revoke %v: acknowledged grant %s is gone\n", k, last[i].User)
						return 1
					}
					err = nil
				}
				last[i] = cpOp{"revoked", ""}
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := json.NewEncoder(os.Stdout).Encode(last); err != nil {
		return 1
	}
	return 0
}

// The reaper daemon and a control plane in another process work on the
// same maps at once: the reaper deletes only expired sessions, never a
// live grant, and never brings back a revoked one.
func TestWithControlPlane(t *testing.T) {
	e := newEnv(t)
	m := e.maps()
	log, stop := e.daemon("--cleanup-interval", "20ms")

	cp := exec.Command(os.Args[0], "-test.run", "^$")
	cp.Env = append(os.Environ(), controlPlaneEnv+"="+e.pin)
	var stderr bytes.Buffer
	cp.Stderr = &stderr
	out, err := cp.Output()
	if err != nil {
		t.Fatalf("control plane: %v\n%s", err, stderr.String())
	}
	var last []cpOp
	if err := json.Unmarshal(out, &last); err != nil {
		t.Fatal(err)
	}
	// Let every short session expire and be swept.
	time.Sleep(200 * time.Millisecond)
	if code := stop(); code != 0 {
		t.Fatalf("reaper exit %d\n%s", code, log)
	}

	var live, short, revoked int
	for i, op := range last {
		s, err := m.Lookup(cpKey(i))
		switch op.Op {
		case "live":
			live++
			if err != nil || s.User != op.User {
				t.Errorf("%v: acknowledged grant %s: found %q, %v", cpKey(i), op.User, s.User, err)
			}
		case "short":
			short++
			if err == nil {
				t.Errorf("%v: %s expired long before the last sweep and is still there", cpKey(i), op.User)
			}
		case "revoked":
			revoked++
			if err == nil {
				t.Errorf("%v: revoked, but present as %s", cpKey(i), s.User)
			}
		}
	}
	reaped := log.JSONLines(t, "reaped session")
	for _, l := range reaped {
		if u := fmt.Sprint(l["user"]); !strings.HasPrefix(u, "short-") {
			t.Errorf("reaped %v, a session granted with an hour of idle timeout", l)
		}
	}
	t.Logf("control plane left %d live, %d short, %d revoked sessions; the reaper reaped %d", live, short, revoked, len(reaped))
	if live == 0 || short == 0 || revoked == 0 || len(reaped) < short {
		t.Fatal("the run did not exercise every case")
	}
}

// A sweep sequence left odd (a reaper killed inside a deleting section)
// is closed by the next sweep, which says so at warn level.
func TestOnceClosesInterruptedSection(t *testing.T) {
	e := newEnv(t)
	m := e.maps()
	var v bpf.AegisSweepSeqValue
	v.Seq = 7
	if err := m.SweepSeq.Update(uint32(0), &v, ebpf.UpdateLock); err != nil {
		t.Fatal(err)
	}
	code, log := e.once()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, log)
	}
	if lines := log.JSONLines(t, "closed the deleting section of a sweep that died inside it"); len(lines) != 1 || lines[0]["level"] != "warn" {
		t.Fatalf("want one warning about the open section:\n%s", log)
	}
	if err := m.SweepSeq.LookupWithFlags(uint32(0), &v, ebpf.LookupLock); err != nil || v.Seq != 8 {
		t.Fatalf("sequence %d after the sweep (%v), want 8", v.Seq, err)
	}
}
