package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/release"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

var (
	releaseMu   sync.Mutex
	releaseDirs = map[string]string{}
)

// buildRelease builds a release's aegis-loader and aegis-controlplane from
// its commit, in a temporary worktree, and returns the directory holding
// them. The build is -trimpath so that the Go build cache, keyed on
// content rather than on the worktree's path, makes a rebuild quick.
//
// A clone without the commit (a shallow one) cannot run the test: it is
// skipped, or failed when kernel tests are required, with the fix.
func buildRelease(t *testing.T, r release.Release) string {
	t.Helper()
	releaseMu.Lock()
	defer releaseMu.Unlock()
	if dir, ok := releaseDirs[r.Version]; ok {
		return dir
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("git", "-C", root, "cat-file", "-e", r.Commit+"^{commit}").CombinedOutput(); err != nil {
		msg := fmt.Sprintf("release %s (commit %s) is not in this clone (%v: %s): the upgrade test builds it from history; fetch it with \"git fetch --unshallow\" or \"git fetch origin %s\"",
			r.Version, r.Commit, err, strings.TrimSpace(string(out)), r.Commit)
		if os.Getenv(tu.RequireKernelEnv) == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	src, err := os.MkdirTemp("", "aegis-release-src-")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = exec.Command("git", "-C", root, "worktree", "remove", "--force", src).Run()
		os.RemoveAll(src)
		_ = exec.Command("git", "-C", root, "worktree", "prune").Run()
	}()
	if out, err := exec.Command("git", "-C", root, "worktree", "add", "--detach", src, r.Commit).CombinedOutput(); err != nil {
		t.Fatalf("git worktree add %s: %v\n%s", r.Commit, err, out)
	}
	dir := filepath.Join(binDir, r.Version)
	build := exec.Command("go", "build", "-trimpath",
		"-ldflags", "-X github.com/aegis-agent/aegis/internal/cli.version="+r.Version,
		"-o", dir+"/", "./cmd/aegis-loader", "./cmd/aegis-controlplane")
	build.Dir = src
	start := time.Now()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build release %s: %v\n%s", r.Version, err, out)
	}
	t.Logf("built release %s from %s in %v", r.Version, r.Commit[:12], time.Since(start).Round(time.Millisecond))
	if out, err := exec.Command(filepath.Join(dir, "aegis-loader"), "--version").CombinedOutput(); err != nil || !strings.Contains(string(out), r.Version) {
		t.Fatalf("release %s's aegis-loader --version: %q %v", r.Version, out, err)
	}
	releaseDirs[r.Version] = dir
	return dir
}

// sessionsV4 reads the IPv4 sessions map as it is pinned, whatever the
// pins' layout version: the session key and value are the same in the
// previous release and this one (the loader keeps the map, which the test
// checks by its id), so this build's types decode both.
func sessionsV4(t *testing.T, pin string) (map[bpf.AegisSessionKeyV4]bpf.AegisSessionValue, ebpf.MapID) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(state.MapPath(pin, state.MapSessionsV4), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	out := map[bpf.AegisSessionKeyV4]bpf.AegisSessionValue{}
	var k bpf.AegisSessionKeyV4
	var v bpf.AegisSessionValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	info, _ := m.Info()
	id, _ := info.ID()
	return out, id
}

// rawStats reads the pinned counters, whatever the pins' layout version.
func rawStats(t *testing.T, pin string) [bpf.StatsSlots]state.Counter {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(state.MapPath(pin, state.MapStats), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	s, err := state.ReadStats(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func v4Key(k state.Key) bpf.AegisSessionKeyV4 {
	return bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(k.Proto)}
}

// waitUntil sleeps until the data path's clock reads at least ns.
func waitUntil(ns uint64) {
	if now := state.Now(); now < ns {
		time.Sleep(time.Duration(ns - now))
	}
}

// The previous release, built from its commit, runs the gateway; its
// control plane grants the sessions. This build's loader, run with the
// same flags under a 2000 datagram/s stream of one session, upgrades in
// place: no datagram lost, the sessions map kept with every session's
// user and timers, the config migrated to this layout, the new maps
// created; a session due to expire expires on time under the new program.
// The previous loader then refuses the newer pins in one line, and this
// loader run again changes nothing.
func TestUpgradeFromPreviousRelease(t *testing.T) {
	tu.RequireKernel(t)
	prev := release.Previous
	old := buildRelease(t, prev)
	oldLoader, oldCP := filepath.Join(old, "aegis-loader"), filepath.Join(old, "aegis-controlplane")

	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	load := []string{"load", "--group", strconv.Itoa(daemonGID), "-r", "60s", "--allow", "203.0.113.0/24,tcp/22"}
	g.run(oldLoader, load...)
	if v, _, err := state.PinnedLayoutVersion(g.pin); err != nil || v != prev.LayoutVersion {
		t.Fatalf("%s pinned layout version %d (%v), want %d", prev.Version, v, err, prev.LayoutVersion)
	}

	if out := g.loader("status"); !strings.Contains(out, fmt.Sprintf("layout version  %d: pins from an older release", prev.LayoutVersion)) ||
		!strings.Contains(out, tu.PublicIface) {
		t.Fatalf("this build's status of %s's pins:\n%s", prev.Version, out)
	}

	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", binary: oldCP})
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	c := rpcCtx(t)
	grant := func(user string, port uint16, idle, lifetime time.Duration) state.Key {
		t.Helper()
		req := &agentv1.LoginEventRequest{User: user, SrcIp: tu.ClientV4.String(), DstIp: tu.ServiceBV4.String(),
			DstPort: uint32(port), Protocol: agentv1.Protocol_PROTOCOL_UDP}
		if port == 7000 {
			req.DstIp = tu.ServiceAV4.String()
		}
		if idle > 0 {
			req.IdleTimeout = durationpb.New(idle)
		}
		if lifetime > 0 {
			req.MaxLifetime = durationpb.New(lifetime)
		}
		if _, err := agent.LoginEvent(c, req); err != nil {
			t.Fatalf("%s's control plane: grant %s: %v", prev.Version, user, err)
		}
		k := udpKey(tu.ClientV4, tu.ServiceBV4, port)
		if port == 7000 {
			k = udpKey(tu.ClientV4, tu.ServiceAV4, port)
		}
		return k
	}
	streamed := grant("alice", 7000, time.Minute, 0)
	idleKey := grant("carol", 7001, 6*time.Second, 0)            // idle: no traffic until just before it is due
	lifetimeKey := grant("dave", 7002, time.Hour, 8*time.Second) // a lifetime: ends 8 s after the grant
	for i := range 20 {
		grant("bob", uint16(10000+i), time.Hour, 0)
	}
	before, sessionsID := sessionsV4(t, g.pin)
	if len(before) != 23 {
		t.Fatalf("%d sessions granted by %s, want 23", len(before), prev.Version)
	}

	sink := g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 7000))
	g.Serve(t, netip.AddrPortFrom(tu.ServiceBV4, 7001))
	g.Serve(t, netip.AddrPortFrom(tu.ServiceBV4, 7002))
	g.Serve(t, netip.AddrPortFrom(tu.ServiceBV4, 7003))
	g.Serve(t, netip.AddrPortFrom(tu.ServiceBV4, 7004)) // no session, ever

	statsBefore := rawStats(t, g.pin)
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	type streamResult struct {
		sent uint64
		err  error
	}
	done := make(chan streamResult, 1)
	go func() {
		n, err := g.Stream(ctx, tu.ClientV4, sink.Addr, 2000)
		done <- streamResult{n, err}
	}()
	time.Sleep(800 * time.Millisecond)
	out := g.loader(load...)
	for _, want := range []string{"created maps sweep_seq,flows_v4,flows_v6,frags,ifaces,events,event_limits,allow_hits,tombs_v4,tombs_v6", "migrated maps config", "upgraded " + tu.PublicIface, "wrote config"} {
		if !strings.Contains(out, want) {
			t.Errorf("upgrade over %s: output lacks %q:\n%s", prev.Version, want, out)
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	got := sink.WaitReceived(r.sent, 3*time.Second)
	t.Logf("streamed %d datagrams across the upgrade from %s, %d arrived", r.sent, prev.Version, got)
	if r.sent < 4000 {
		t.Fatalf("only %d datagrams sent; the stream did not run", r.sent)
	}
	if got != r.sent {
		t.Fatalf("lost %d of %d datagrams across the upgrade", r.sent-got, r.sent)
	}
	statsAfter := g.stats() // this build's reader: the pins are of its layout now
	for _, reason := range []bpf.Reason{bpf.ReasonNoSession, bpf.ReasonExpired, bpf.ReasonMalformed} {
		if d := statsAfter[reason].Packets - statsBefore[reason].Packets; d != 0 {
			t.Fatalf("%d packets dropped as %v during the upgrade", d, reason)
		}
	}
	if statsAfter[bpf.ReasonSession].Packets < statsBefore[bpf.ReasonSession].Packets+r.sent {
		t.Fatalf("session counter %d after, %d before and %d streamed: the counters were not kept",
			statsAfter[bpf.ReasonSession].Packets, statsBefore[bpf.ReasonSession].Packets, r.sent)
	}

	if v, _, err := state.PinnedLayoutVersion(g.pin); err != nil || v != bpf.LayoutVersion {
		t.Fatalf("layout version %d after the upgrade (%v), want %d", v, err, bpf.LayoutVersion)
	}
	sessionsAfter, afterID := sessionsV4(t, g.pin)
	if afterID != sessionsID {
		t.Fatalf("sessions map replaced (id %d, was %d): its layout did not change", afterID, sessionsID)
	}
	if len(sessionsAfter) != len(before) {
		t.Fatalf("%d sessions after the upgrade, %d before", len(sessionsAfter), len(before))
	}
	for k, b := range before {
		a, ok := sessionsAfter[k]
		if !ok {
			t.Fatalf("session %+v lost", k)
		}
		if k == v4Key(streamed) {
			if a.LastSeenNs < b.LastSeenNs {
				t.Fatalf("streamed session's last_seen went back: %d -> %d", b.LastSeenNs, a.LastSeenNs)
			}
			a.LastSeenNs = b.LastSeenNs // refreshed by the stream, by design
		}
		if a != b {
			t.Fatalf("session %+v changed across the upgrade:\n before %+v\n after  %+v", k, b, a)
		}
	}

	// The new maps exist and bpftool decodes them (and the new config)
	// from their BTF.
	for _, name := range []string{state.MapFlowsV4, state.MapFlowsV6, state.MapFrags, state.MapConfig} {
		raw := tu.MustRun(t, "bpftool", "-j", "map", "dump", "pinned", state.MapPath(g.pin, name))
		var dump []map[string]any
		if err := json.Unmarshal([]byte(raw), &dump); err != nil {
			t.Fatalf("bpftool dump of %s: %v\n%s", name, err, raw)
		}
		if name == state.MapConfig && (len(dump) != 1 || !strings.Contains(raw, `"flow_idle_udp_ns"`)) {
			t.Fatalf("config is not this layout's: %s", raw)
		}
	}
	// Every pin, migrated and created ones too, is the daemons' group's.
	for _, name := range state.MapNames {
		fi, err := os.Stat(state.MapPath(g.pin, name))
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o640)
		if state.DaemonWritable(name) {
			want = 0o660
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != daemonGID || fi.Mode().Perm() != want {
			t.Errorf("pin %s after the upgrade: uid %d gid %d mode %v, want 0 %d %v", name, st.Uid, st.Gid, fi.Mode().Perm(), daemonGID, want)
		}
	}
	var st struct {
		LayoutVersion uint32 `json:"layout_version"`
		AllowHits     []struct {
			Rule    string `json:"rule"`
			ID      uint8  `json:"id"`
			Packets uint64 `json:"packets"`
		} `json:"allow_hits"`
	}
	if out := g.loader("status", "--json"); json.Unmarshal([]byte(out), &st) != nil || st.LayoutVersion != bpf.LayoutVersion {
		t.Fatalf("status after the upgrade:\n%s", out)
	}
	// The old release's allow rule, whose pairs carried no rule id (the
	// byte was padding), now has one and counts what it admits.
	if len(st.AllowHits) != 1 || st.AllowHits[0].Rule != "203.0.113.0/24,tcp/22" || st.AllowHits[0].ID == 0 || st.AllowHits[0].Packets != 0 {
		t.Fatalf("allow rules after the upgrade: %+v", st.AllowHits)
	}
	g.Client.OpenLink(t, "cli0").Send(t, mac(t, g.Gateway, tu.PublicIface),
		tu.TCPPacket(netip.MustParseAddrPort("203.0.113.9:40000"), netip.AddrPortFrom(tu.ServiceAV4, 22), tu.TCPSyn, 64))
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if json.Unmarshal([]byte(g.loader("status", "--json")), &st) == nil && len(st.AllowHits) == 1 && st.AllowHits[0].Packets == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("allow rule hits after a packet it admits: %+v", st.AllowHits)
		}
	}

	// The old release's control plane still holds the sessions map, which
	// is the new program's too: its grants keep working until it is
	// restarted with the new release.
	erin := grant("erin", 7003, time.Minute, 0)
	g.expectPass("a grant by the old control plane after the upgrade", bpf.ReasonSession,
		func() error { return g.UDP(erin.Src, netip.AddrPortFrom(erin.Dst, erin.Port), probeTimeout) })

	// Timers carried over run out when due under the new program, not
	// before and not after. The idle session passes just before its idle
	// timeout (measured from v0.1.0's grant) has run out, which refreshes
	// it, and is refused just after the timeout has run out again from
	// that refresh. The lifetime session passes just before its end and is
	// refused just after it.
	probe := func(k state.Key) func() error {
		return func() error { return g.UDP(k.Src, netip.AddrPortFrom(k.Dst, k.Port), probeTimeout) }
	}
	const early, late = 800 * time.Millisecond, 200 * time.Millisecond
	idle, life := sessionsAfter[v4Key(idleKey)], sessionsAfter[v4Key(lifetimeKey)]
	idleDue := idle.LastSeenNs + idle.IdleTimeoutNs
	if now := state.Now(); now+uint64(early) > idleDue {
		t.Fatalf("too slow: the idle session is due in %v, the test needs %v", time.Duration(int64(idleDue-now)), early)
	}
	waitUntil(idleDue - uint64(early))
	g.expectPass("the idle session just before its idle timeout", bpf.ReasonSession, probe(idleKey))
	waitUntil(life.ExpiresNs - uint64(early))
	g.expectPass("the lifetime session just before its end", bpf.ReasonSession, probe(lifetimeKey))
	waitUntil(life.ExpiresNs + uint64(late))
	g.expectBlocked("the lifetime session just after its end", bpf.ReasonExpired, probe(lifetimeKey))
	refreshed, err := g.maps().Lookup(idleKey)
	if err != nil || refreshed.LastSeen <= idle.LastSeenNs {
		t.Fatalf("the idle session's probe did not refresh it: %+v %v", refreshed, err)
	}
	waitUntil(refreshed.LastSeen + idle.IdleTimeoutNs + uint64(late))
	g.expectBlocked("the idle session just after its idle timeout", bpf.ReasonExpired, probe(idleKey))

	// A downgrade is refused in one line, and changes nothing.
	progBefore := g.loader("status", "--json")
	cmd := g.Gateway.Command(oldLoader, "load", "-i", tu.PublicIface, "-c", tu.ControllerV4.String(),
		"--group", strconv.Itoa(daemonGID), "-r", "60s", "--pin-path", g.pin)
	refusal, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() == 0 {
		t.Fatalf("%s's loader over this layout's pins: %v\n%s", prev.Version, err, refusal)
	}
	lines := strings.Split(strings.TrimSpace(string(refusal)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], fmt.Sprintf("layout version %d", bpf.LayoutVersion)) {
		t.Fatalf("downgrade refusal is not one line naming the layout version:\n%s", refusal)
	}
	t.Logf("%s refuses: %s", prev.Version, lines[0])
	if v, _, _ := state.PinnedLayoutVersion(g.pin); v != bpf.LayoutVersion {
		t.Fatalf("the refused downgrade left layout version %d", v)
	}
	if now := g.loader("status", "--json"); stripCounters(now) != stripCounters(progBefore) {
		t.Fatalf("the refused downgrade changed the pins:\n%s\n->\n%s", progBefore, now)
	}
	g.expectPass("the streamed session after the refused downgrade", bpf.ReasonSession,
		func() error {
			return g.UDP(streamed.Src, netip.AddrPortFrom(streamed.Dst, streamed.Port), probeTimeout)
		})

	if out := g.loader(load...); !strings.Contains(out, "already loaded") {
		t.Fatalf("second run of this build's loader changed something:\n%s", out)
	}

	// Rolling back without losing a session, as docs/operations.md says:
	// remove the pins the previous release does not know or cannot read
	// (the running program keeps those maps), then run its loader, which
	// reuses the maps whose layout it shares and moves the same links to
	// its program.
	linkBefore := linkID(t, g.pin)
	for _, name := range []string{state.MapConfig, state.MapFlowsV4, state.MapFlowsV6, state.MapFrags} {
		if err := os.Remove(state.MapPath(g.pin, name)); err != nil {
			t.Fatal(err)
		}
	}
	if out := g.run(oldLoader, load...); !strings.Contains(out, "upgraded "+tu.PublicIface) {
		t.Fatalf("rollback to %s did not move the link to its program:\n%s", prev.Version, out)
	}
	if v, _, _ := state.PinnedLayoutVersion(g.pin); v != prev.LayoutVersion {
		t.Fatalf("layout version %d after the rollback, want %d", v, prev.LayoutVersion)
	}
	if id := linkID(t, g.pin); id != linkBefore {
		t.Fatalf("the rollback replaced the link (%d, was %d): the interface was unfiltered in between", id, linkBefore)
	}
	rolled, rolledID := sessionsV4(t, g.pin)
	if rolledID != sessionsID || len(rolled) != len(before)+1 {
		t.Fatalf("after the rollback: sessions map %d with %d sessions, want map %d with %d", rolledID, len(rolled), sessionsID, len(before)+1)
	}
	if err := g.UDP(streamed.Src, netip.AddrPortFrom(streamed.Dst, streamed.Port), probeTimeout); err != nil {
		t.Fatalf("the streamed session after the rollback: %v", err)
	}
	dropped := rawStats(t, g.pin)[bpf.ReasonNoSession].Packets
	if err := g.UDP(tu.ClientV4, netip.AddrPortFrom(tu.ServiceBV4, 7004), probeTimeout); err == nil {
		t.Fatal("a datagram without a session passed after the rollback")
	}
	if rawStats(t, g.pin)[bpf.ReasonNoSession].Packets == dropped {
		t.Fatal("after the rollback, a datagram without a session was not dropped by the filter")
	}
}

// linkID returns the id of the pinned XDP link on the public interface.
func linkID(t *testing.T, pin string) link.ID {
	t.Helper()
	lk, err := link.LoadPinnedLink(state.LinkPath(pin, tu.PublicIface), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.ID
}

// stripCounters drops what the traffic changes from a status document:
// fill and counters.
func stripCounters(statusJSON string) string {
	var st map[string]any
	if err := json.Unmarshal([]byte(statusJSON), &st); err != nil {
		return statusJSON
	}
	delete(st, "counters")
	if maps, ok := st["maps"].([]any); ok {
		for _, m := range maps {
			delete(m.(map[string]any), "entries")
		}
	}
	b, _ := json.Marshal(st)
	return string(b)
}
