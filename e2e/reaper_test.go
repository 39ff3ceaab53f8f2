package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// bpftoolSessions lists the keys of a pinned sessions map as bpftool
// prints them, "proto src -> dst:port".
func bpftoolSessions(t *testing.T, pin string) []string {
	t.Helper()
	out := tu.MustRun(t, "bpftool", "-j", "map", "dump", "pinned", state.MapPath(pin, state.MapSessionsV4))
	// With -j, bpftool prints the BTF-decoded entry under "formatted".
	var entries []struct {
		Formatted struct {
			Key struct {
				Src   [4]byte `json:"src"`
				Dst   [4]byte `json:"dst"`
				Dport uint16  `json:"dport"`
				Proto uint8   `json:"proto"`
			} `json:"key"`
		} `json:"formatted"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("bpftool output: %v\n%s", err, out)
	}
	var keys []string
	for _, e := range entries {
		k := e.Formatted.Key
		keys = append(keys, state.Key{Src: netip.AddrFrom4(k.Src), Dst: netip.AddrFrom4(k.Dst), Port: k.Dport,
			Proto: state.Protocol(k.Proto)}.String())
	}
	return keys
}

// An idle client loses access the moment its timeout passes; the next
// sweep of aegis-reaper deletes the entry, and bpftool no longer lists it.
func TestReaperEndToEnd(t *testing.T) {
	g := newGateway(t, "load")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	g.Serve(t, svc)
	probe := func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) }

	idle := tcpKey(tu.ClientV4, tu.ServiceAV4, 8080)
	other := tcpKey(tu.OtherClientV4, tu.ServiceAV4, 8080)
	g.grant(state.Session{Key: idle, User: "alice", IdleTimeout: time.Second})
	g.grant(state.Session{Key: other, User: "bob", IdleTimeout: time.Hour})
	g.expectPass("TCP after the grant", bpf.ReasonSession, probe)

	// Idle past the timeout: blocked at once, before any sweep, as expired.
	time.Sleep(1200 * time.Millisecond)
	g.expectBlocked("TCP after idling past the timeout", bpf.ReasonExpired, probe)
	if listed := bpftoolSessions(t, g.pin); !contains(listed, idle.String()) {
		t.Fatalf("before the sweep bpftool lists %v, want %v among them", listed, idle)
	}

	out := g.run(bin("aegis-reaper"), "--once", "--log-format", "json")
	var line struct {
		User, Src, Dst, Reason, Message string
		Dport                           uint16
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if err := json.Unmarshal([]byte(l), &line); err == nil && line.Message == "reaped session" {
			break
		}
	}
	if line.User != "alice" || line.Src != tu.ClientV4.String() || line.Dst != tu.ServiceAV4.String() || line.Dport != 8080 || line.Reason != "idle" {
		t.Fatalf("aegis-reaper --once logged %+v\n%s", line, out)
	}
	listed := bpftoolSessions(t, g.pin)
	if contains(listed, idle.String()) || !contains(listed, other.String()) {
		t.Fatalf("after the sweep bpftool lists %v, want only %v", listed, other)
	}
	// Still blocked, now for want of a session.
	g.expectBlocked("TCP after the sweep", bpf.ReasonNoSession, probe)
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// reaperProcess is a running aegis-reaper whose log lines are collected.
type reaperProcess struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	first chan struct{} // closed at the first "reaped session" line
	done  chan struct{} // closed when stderr is drained
}

func startReaper(t *testing.T, env []string, args ...string) *reaperProcess {
	t.Helper()
	p := &reaperProcess{cmd: exec.Command(bin("aegis-reaper"), append(args, "--log-format", "json")...),
		first: make(chan struct{}), done: make(chan struct{})}
	p.cmd.Env = append(p.cmd.Environ(), env...)
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		seen := false
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
			if !seen && strings.Contains(sc.Text(), `"message":"reaped session"`) {
				seen = true
				close(p.first)
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	return p
}

func (p *reaperProcess) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

func (p *reaperProcess) count(msg string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.lines {
		if strings.Contains(l, `"message":"`+msg+`"`) {
			n++
		}
	}
	return n
}

// waitReaped waits for the first reaped session.
func (p *reaperProcess) waitReaped(t *testing.T) {
	t.Helper()
	select {
	case <-p.first:
	case <-time.After(20 * time.Second):
		t.Fatalf("no session reaped within 20s\n%s", p.log())
	}
}

// A session kept alive by real packets through XDP outlives many sweeps of
// a 1s idle timeout; an idle one next to it is reaped.
func TestReaperKeepsSessionsRefreshedByPackets(t *testing.T) {
	g := newGateway(t, "load")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	srv := g.Serve(t, svc)
	active := udpKey(tu.ClientV4, tu.ServiceAV4, 8080)
	idle := udpKey(tu.OtherClientV4, tu.ServiceAV4, 8080)
	g.grant(state.Session{Key: active, User: "alice", IdleTimeout: time.Second})
	g.grant(state.Session{Key: idle, User: "bob", IdleTimeout: time.Second})

	p := startReaper(t, nil, "--pin-path", g.pin, "--cleanup-interval", "100ms")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	sent, err := g.Stream(ctx, tu.ClientV4, svc, 50)
	if err != nil {
		t.Fatal(err)
	}
	if got := srv.WaitReceived(sent, 2*time.Second); got != sent {
		t.Fatalf("the service received %d of %d datagrams", got, sent)
	}
	m := g.maps()
	if _, err := m.Lookup(active); err != nil {
		t.Fatalf("session refreshed by packets: %v\n%s", err, p.log())
	}
	if _, err := m.Lookup(idle); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("idle session: %v, want it reaped\n%s", err, p.log())
	}
	if n := p.count("reaped session"); n != 1 || !strings.Contains(p.log(), `"user":"bob"`) || strings.Contains(p.log(), `"user":"alice"`) {
		t.Fatalf("%d reaped lines, want only bob's:\n%s", n, p.log())
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("aegis-reaper on SIGTERM: %v\n%s", err, p.log())
	}
}

// bigMap loads the data path with room for 2n sessions and fills
// sessions_v4 with n expired and n live sessions; it returns the live
// ones' values by key.
func bigMap(t *testing.T, n int) (*gateway, map[bpf.AegisSessionKeyV4]bpf.AegisSessionValue) {
	t.Helper()
	ns := tu.NewNetns(t, "aegis-big-")
	ns.AddVeth(t, "a0", "a1")
	g := &gateway{t: t, pin: tu.PinDir(t)}
	out, err := ns.Command(bin("aegis-loader"), "load", "-i", "a0", "--group", "root", "--pin-path", g.pin,
		"--max-sessions", fmt.Sprint(2*n)).CombinedOutput()
	if err != nil {
		t.Fatalf("aegis-loader load: %v\n%s", err, out)
	}
	m := g.maps()
	now := state.Now()
	live := make(map[bpf.AegisSessionKeyV4]bpf.AegisSessionValue, n)
	const chunk = 16384
	keys := make([]bpf.AegisSessionKeyV4, 0, chunk)
	vals := make([]bpf.AegisSessionValue, 0, chunk)
	for i := range 2 * n {
		// Documentation ranges only: 203.0.113.0/24 to 198.51.100.0/24,
		// with the port making up the rest.
		k := bpf.AegisSessionKeyV4{Src: [4]byte{203, 0, 113, byte(i)}, Dst: [4]byte{198, 51, 100, byte(i >> 8)},
			Dport: uint16(1 + i>>16), Proto: 6}
		v := bpf.AegisSessionValue{LastSeenNs: now - uint64(time.Hour), CreatedNs: now - uint64(time.Hour),
			IdleTimeoutNs: uint64(time.Second)}
		user := "expired"
		if i%2 == 1 {
			v = bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now - uint64(i), IdleTimeoutNs: uint64(time.Hour)}
			user = fmt.Sprintf("live%d", i)
			live[k] = v
		}
		for j := range user {
			v.User[j] = int8(user[j])
		}
		if i%2 == 1 {
			live[k] = v
		}
		keys, vals = append(keys, k), append(vals, v)
		if len(keys) == chunk || i == 2*n-1 {
			if _, err := m.SessionsV4.BatchUpdate(keys, vals, nil); err != nil {
				t.Fatal(err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
	return g, live
}

// checkNothingLiveLost fails t unless every live session is in the map
// with its value unchanged. It returns how many expired ones are left.
func checkNothingLiveLost(t *testing.T, g *gateway, live map[bpf.AegisSessionKeyV4]bpf.AegisSessionValue) int {
	t.Helper()
	m := g.maps()
	keys := make([]bpf.AegisSessionKeyV4, 4096)
	vals := make([]bpf.AegisSessionValue, 4096)
	var cursor ebpf.MapBatchCursor
	found, expired := 0, 0
	for {
		n, err := m.SessionsV4.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			if want, ok := live[keys[i]]; ok {
				found++
				if vals[i] != want {
					t.Fatalf("live session %v changed: %+v, want %+v", keys[i], vals[i], want)
				}
			} else {
				expired++
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if found != len(live) {
		t.Fatalf("%d of %d live sessions left", found, len(live))
	}
	return expired
}

const bigSessions = 200_000

// kill -9 in the middle of a sweep loses no live session: the sweep never
// deletes one, so there is nothing to be halfway through.
func TestReaperKilledMidSweep(t *testing.T) {
	g, live := bigMap(t, bigSessions)
	p := startReaper(t, nil, "--once", "--pin-path", g.pin)
	p.waitReaped(t)
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Wait()
	left := checkNothingLiveLost(t, g, live)
	t.Logf("killed after %d reaped lines; %d of %d expired sessions left", p.count("reaped session"), left, bigSessions)
	if left == 0 || left == bigSessions {
		t.Fatalf("%d expired sessions left: the kill did not land mid-sweep", left)
	}
	// The next run finishes the job.
	if out, err := exec.Command(bin("aegis-reaper"), "--once", "--pin-path", g.pin, "--log-level", "warn").CombinedOutput(); err != nil {
		t.Fatalf("aegis-reaper --once: %v\n%s", err, out)
	}
	if left := checkNothingLiveLost(t, g, live); left != 0 {
		t.Fatalf("%d expired sessions left after a full sweep", left)
	}
}

// SIGTERM in the middle of a sweep stops the daemon between two batches,
// promptly and with exit status 0.
func TestReaperStopsMidSweep(t *testing.T) {
	g, live := bigMap(t, bigSessions)
	p := startReaper(t, nil, "--pin-path", g.pin, "--cleanup-interval", "1h")
	p.waitReaped(t)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- p.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit on SIGTERM: %v\n%s", err, p.log())
		}
	case <-time.After(2 * time.Second):
		t.Fatal("aegis-reaper did not stop within 2s of SIGTERM")
	}
	<-p.done
	left := checkNothingLiveLost(t, g, live)
	if left == 0 || left == bigSessions {
		t.Fatalf("%d expired sessions left: SIGTERM did not land mid-sweep", left)
	}
	if p.count("sweep") != 1 || !strings.Contains(p.log(), `"complete":false`) || p.count("reaper stopped") != 1 {
		t.Fatalf("want an incomplete sweep summary and a clean stop in the log:\n%s", lastLines(p.log(), 5))
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// loadedPins loads the data path on a veth in a fresh namespace with the
// given extra loader arguments and returns the gateway (without topology).
func loadedPins(t *testing.T, extra ...string) *gateway {
	t.Helper()
	ns := tu.NewNetns(t, "aegis-rpp-")
	ns.AddVeth(t, "a0", "a1")
	g := &gateway{t: t, pin: tu.PinDir(t)}
	args := append([]string{"load", "-i", "a0", "--pin-path", g.pin}, extra...)
	if out, err := ns.Command(bin("aegis-loader"), args...).CombinedOutput(); err != nil {
		t.Fatalf("aegis-loader %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return g
}

// The reaper needs no more than the deployment gives it: an unprivileged
// user in the pins' group, with CAP_BPF and no other capability.
func TestReaperUnprivileged(t *testing.T) {
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatal("setpriv (util-linux) is needed")
	}
	// nobody:nogroup stands in for aegis:aegis.
	g := loadedPins(t, "--group", "nogroup")
	now := state.Now()
	expired := tcpKey(tu.ClientV4, tu.ServiceAV4, 22)
	live := tcpKey(tu.ClientV4, tu.ServiceAV4, 443)
	m := g.maps()
	for _, s := range []state.Session{
		{Key: expired, User: "alice", LastSeen: now - uint64(time.Minute), Created: now, IdleTimeout: time.Second},
		{Key: live, User: "alice", LastSeen: now, Created: now, IdleTimeout: time.Hour},
	} {
		if err := m.Grant(s); err != nil {
			t.Fatal(err)
		}
	}
	run := func(group, caps string) (string, error) {
		cmd := exec.Command("setpriv", "--reuid", "nobody", "--regid", group, "--clear-groups",
			"--inh-caps", "-all"+caps, "--ambient-caps", "-all"+caps, "--bounding-set", "-all"+caps,
			bin("aegis-reaper"), "--once", "--pin-path", g.pin, "--log-format", "json")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	// Outside the pins' group: one line naming the problem and the fix.
	out, err := run("65533", ",+bpf")
	if err == nil || !strings.Contains(out, "permission denied") || !strings.Contains(out, "group") ||
		strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Fatalf("outside the pins' group: %v, want one line about the group:\n%s", err, out)
	}
	// Kernels before 6.5, or with unprivileged BPF disabled on older ones,
	// also want CAP_BPF to open a pin; newer ones let the pins' file
	// permissions decide. Either way this is all the reaper is given.
	out, err = run("nogroup", ",+bpf")
	if err != nil || !strings.Contains(out, `"message":"reaped session"`) {
		t.Fatalf("with CAP_BPF only: %v\n%s", err, out)
	}
	if _, err := m.Lookup(expired); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("expired session: %v, want it reaped", err)
	}
	if _, err := m.Lookup(live); err != nil {
		t.Fatalf("live session: %v", err)
	}
}

// Under systemd (Type=notify, WatchdogSec=) the daemon reports readiness,
// says in its status what it does, pings the watchdog while it is healthy,
// including while it waits for the loader, and says when it stops.
func TestReaperSystemdNotify(t *testing.T) {
	for _, loaded := range []bool{true, false} {
		t.Run(fmt.Sprintf("loaded=%v", loaded), func(t *testing.T) {
			pin := tu.PinDir(t)
			if loaded {
				pin = loadedPins(t, "--group", "root").pin
			}
			sock := tu.NewNotifySocket(t, t.TempDir())
			cmd := exec.Command(bin("aegis-reaper"), "--pin-path", pin, "--cleanup-interval", "50ms", "--log-format", "json")
			cmd.Env = append(cmd.Environ(), "NOTIFY_SOCKET="+sock.Path, "WATCHDOG_USEC=200000")
			out := &strings.Builder{}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

			status := sock.Expect(t, "STATUS=", 10*time.Second)
			want := "STATUS=sweeping " + pin
			if !loaded {
				want = "STATUS=waiting for aegis-loader"
			}
			if !strings.HasPrefix(status, want) {
				t.Fatalf("status %q, want %q", status, want)
			}
			sock.Expect(t, "READY=1", 10*time.Second)
			for range 3 {
				sock.Expect(t, "WATCHDOG=1", 10*time.Second)
			}
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			sock.Expect(t, "STOPPING=1", 10*time.Second)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("exit on SIGTERM: %v\n%s", err, out)
			}
		})
	}
}

// The watchdog stops being pinged while sweeps fail, here because the
// pinned sessions_v4 was replaced by a map of another layout, and is
// pinged again once they succeed.
func TestReaperWatchdogFollowsHealth(t *testing.T) {
	g := loadedPins(t, "--group", "root")
	sock := tu.NewNotifySocket(t, t.TempDir())
	p := startReaper(t, []string{"NOTIFY_SOCKET=" + sock.Path, "WATCHDOG_USEC=200000"},
		"--pin-path", g.pin, "--cleanup-interval", "50ms")
	sock.Expect(t, "READY=1", 10*time.Second)
	sock.Expect(t, "WATCHDOG=1", 10*time.Second)

	path := state.MapPath(g.pin, state.MapSessionsV4)
	replace := func(spec *ebpf.MapSpec) {
		t.Helper()
		mp, err := ebpf.NewMap(spec)
		if err != nil {
			t.Fatal(err)
		}
		defer mp.Close()
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := mp.Pin(path); err != nil {
			t.Fatal(err)
		}
	}
	replace(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 12, ValueSize: 8, MaxEntries: 16})
	waitLog(t, p, "sweep failed")
	if !strings.Contains(p.log(), "incompatible") {
		t.Fatalf("the failure does not say what is wrong:\n%s", lastLines(p.log(), 3))
	}
	// Drop what was sent before the failure; then nothing for 3 periods.
	sock.Drain()
	sock.ExpectNone(t, "WATCHDOG=1", 600*time.Millisecond)

	spec, err := state.Spec()
	if err != nil {
		t.Fatal(err)
	}
	good := spec.Maps[state.MapSessionsV4].Copy()
	good.Pinning = ebpf.PinNone
	replace(good)
	sock.Expect(t, "WATCHDOG=1", 10*time.Second)
}

func waitLog(t *testing.T, p *reaperProcess, msg string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.count(msg) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log within 10s:\n%s", msg, p.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
