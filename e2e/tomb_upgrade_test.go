package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/release"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// beforeTombstones is the last build whose data path had no tombstone
// maps: the same layout version as this one, so an upgrade from it only
// creates maps.
var beforeTombstones = release.Release{
	Version:       "pre-tombstones",
	Commit:        "162a23c46983eb13f6f0a624b825265fe8f36664",
	LayoutVersion: 2,
}

// Pins of the build before tombstones, with sessions granted by its
// control plane and a stream through one of them, upgraded in place by
// this loader: the tombstone maps are created empty, nothing else is
// replaced, the stream loses nothing, and with this build's control plane
// a revoke while the service keeps sending lets nothing through, where
// the old build, measured the same way first, let the user's datagrams
// through as reply.
func TestUpgradeAddsTombstones(t *testing.T) {
	tu.RequireKernel(t)
	dir := buildRelease(t, beforeTombstones)
	oldLoader, oldCP := filepath.Join(dir, "aegis-loader"), filepath.Join(dir, "aegis-controlplane")

	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	load := []string{"load", "--group", strconv.Itoa(daemonGID)}
	g.run(oldLoader, load...)
	for _, name := range []string{state.MapTombsV4, state.MapTombsV6} {
		if _, err := os.Stat(state.MapPath(g.pin, name)); !os.IsNotExist(err) {
			t.Fatalf("%s pinned %s (%v): not the build before tombstones", beforeTombstones.Version, name, err)
		}
	}

	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", binary: oldCP})
	svc := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	sinkAddr := netip.AddrPortFrom(tu.ServiceBV4, 7000)
	ps := startPushService(t, g, svc)
	var agent agentv1.AgentServiceClient
	var c context.Context
	login := func(t *testing.T, dst netip.AddrPort) {
		t.Helper()
		if _, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
			DstIp: dst.Addr().String(), DstPort: uint32(dst.Port()), Protocol: agentv1.Protocol_PROTOCOL_UDP}); err != nil {
			t.Fatalf("LoginEvent: %v", err)
		}
	}
	grant := func(t *testing.T) { login(t, svc) }
	revoke := func(t *testing.T) {
		t.Helper()
		if resp, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
			DstIp: svc.Addr().String(), DstPort: uint32(svc.Port()), Protocol: agentv1.Protocol_PROTOCOL_UDP}); err != nil || resp.GetRevoked() != 1 {
			t.Fatalf("LogoutEvent: %v %v", resp, err)
		}
	}
	agent, c = agentv1.NewAgentServiceClient(cp.dial(p.controller)), rpcCtx(t)

	// The old build lets the revoked user's datagrams through while the
	// service keeps sending: the measurement tells the two builds apart.
	old := measureRemoval(t, g, ps, svc, 40099, grant, revoke, bpf.ReasonNoSession)
	t.Logf("%s: %d of the user's datagrams reached the service in the 500 ms after the revoke (%d as reply)",
		beforeTombstones.Version, old.fromPort, old.reply)
	if old.fromPort == 0 || old.reply == 0 {
		t.Errorf("%s let nothing through after the revoke: the measurement cannot tell the builds apart", beforeTombstones.Version)
	}
	login(t, sinkAddr)
	_, sessionsID := sessionsV4(t, g.pin)

	// A connection from the private side to a public server, opened under
	// the old build: its flow has no port mark, which this build's loader
	// adds before the data path may skip the flow lookup at its port.
	public := netip.AddrPortFrom(tu.ClientV4, 8081)
	conns := lineServer(t, g.Client, public)
	fwd, err := dialIn(g.Private, "tcp", netip.AddrPortFrom(tu.ServiceAV4, 0), public.String(), probeTimeout)
	if err != nil {
		t.Fatalf("connect through the old build: %v", err)
	}
	defer fwd.Close()
	srvSide := <-conns
	go func() { _, _ = io.Copy(srvSide, srvSide) }() // echo
	if err := exchange(fwd, "before the upgrade", probeTimeout); err != nil {
		t.Fatalf("exchange through the old build: %v", err)
	}

	sink := g.Serve(t, sinkAddr)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
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
	time.Sleep(600 * time.Millisecond)
	// The egress program changed; the XDP program may or may not have
	// (tombstones are egress state), so only the former is required.
	var res loader.Result
	args := []string{"load", "-i", tu.PublicIface, "-c", tu.ControllerV4.String(), "--pin-path", g.pin,
		"--group", strconv.Itoa(daemonGID), "--json", "--log-level", "error"}
	out, err := g.Gateway.Command(bin("aegis-loader"), args...).Output()
	if err != nil {
		t.Fatalf("aegis-loader %v: %v\n%s", args, err, out)
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("upgrade over %s: %v\n%s", beforeTombstones.Version, err, out)
	}
	if !slices.Equal(res.CreatedMaps, []string{state.MapAllowHits, state.MapTombsV4, state.MapTombsV6, state.MapPortMarks}) || len(res.MigratedMaps) != 0 ||
		!slices.Contains(res.EgressUpgraded, tu.PublicIface) {
		t.Errorf("upgrade over %s: %+v, want the tombstone maps created, nothing migrated, the egress program upgraded", beforeTombstones.Version, res)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if got := sink.WaitReceived(r.sent, 3*time.Second); got != r.sent || r.sent < 2000 {
		t.Fatalf("streamed %d datagrams across the upgrade, %d arrived", r.sent, got)
	}
	if after, id := sessionsV4(t, g.pin); id != sessionsID || len(after) != 2 { // the re-grant and the sink
		t.Fatalf("after the upgrade: sessions map %d (was %d) with %d sessions, want the same map with 2", id, sessionsID, len(after))
	}
	for _, name := range []string{state.MapTombsV4, state.MapTombsV6, state.MapPortMarks} {
		fi, err := os.Stat(state.MapPath(g.pin, name))
		if err != nil || fi.Mode().Perm() != 0o660 {
			t.Fatalf("%s after the upgrade: %v %v, want mode 0660", name, fi, err)
		}
	}
	if _, flows, err := state.MarksTrusted(g.maps().PortMarks); err != nil || !flows {
		t.Fatalf("flow marks after the upgrade: trusted %v (%v), want trusted", flows, err)
	}
	if err := exchange(fwd, "after the upgrade", probeTimeout); err != nil {
		t.Fatalf("the old build's connection after the upgrade: %v", err)
	}

	// The daemons of this build, as the upgrade procedure restarts them.
	_ = cp.kill(syscall.SIGKILL)
	cp = startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	agent, c = agentv1.NewAgentServiceClient(cp.dial(p.controller)), rpcCtx(t)
	revokeAll(t, g, svc) // the old measurement's re-grant
	measureRemoval(t, g, ps, svc, 40100, grant, revoke, bpf.ReasonNoSession).check(t, bpf.ReasonNoSession)
}
