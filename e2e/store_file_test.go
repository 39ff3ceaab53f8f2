package e2e

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// One gateway with --store file: the control plane stops, the loader
// unloads (every pin removed) and loads again, as after a reboot, and
// the control plane restores every session before READY=1: real packets
// pass at once, with the lifetime and idle time they had. A simulated
// downtime (the stored wall-clock times moved back, as if the gateway had
// been off for 90 s while its monotonic clock started again) counts as
// idle time: sessions idle longer than their timeout by then stay closed.
// A revoke before the restart stays revoked.
func TestStoreFileSurvivesReload(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	dir, err := os.MkdirTemp("", "aegis-store-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, daemonUID, daemonGID); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sessions.db")
	args := []string{"--store", "file:" + path, "--gateway-id", "gw", "--activity-interval", "300ms"}
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", args: args})

	tcpSvc := netip.AddrPortFrom(tu.ServiceAV4, 8443)
	udpSvc := netip.AddrPortFrom(tu.ServiceBV4, 5353)
	g.Serve(t, tcpSvc)
	g.Serve(t, udpSvc)
	tcp := func() error { return g.TCP(tu.ClientV4, tcpSvc, probeTimeout) }
	udp := func() error { return g.UDP(tu.ClientV4, udpSvc, probeTimeout) }
	compatTCP := func() error { return g.TCP(tu.OtherClientV4, tcpSvc, probeTimeout) }

	c := rpcCtx(t)
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	compat := session.NewSessionManagerClient(cp.dial(p.controller))
	// alice: TCP, 5 min idle, 1 h lifetime; bob: UDP, 30 s idle; the
	// compat session: the loader's default idle (60 s).
	if _, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(), DstIp: tu.ServiceAV4.String(),
		DstPort: 8443, IdleTimeout: durationpb.New(5 * time.Minute), MaxLifetime: durationpb.New(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, &agentv1.LoginEventRequest{User: "bob", SrcIp: tu.ClientV4.String(), DstIp: tu.ServiceBV4.String(),
		DstPort: 5353, Protocol: agentv1.Protocol_PROTOCOL_UDP, IdleTimeout: durationpb.New(30 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(tu.OtherClientV4), DstIp: ip4(tu.ServiceAV4), DstPort: 8443, Activate: true}); err != nil {
		t.Fatal(err)
	}
	g.expectPass("alice's TCP", bpf.ReasonSession, tcp)
	g.expectPass("bob's UDP", bpf.ReasonSession, udp)
	g.expectPass("the compat session's TCP", bpf.ReasonSession, compatTCP)
	time.Sleep(time.Second) // the traffic's last_seen published to the store
	aliceKey := state.Key{Src: tu.ClientV4, Dst: tu.ServiceAV4, Port: 8443, Proto: state.TCP}
	before := g.snapshot()

	// Stop, unload (all pins gone), load: empty maps, nothing passes.
	if err := cp.kill(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, cp.out.String())
	}
	g.loader("unload")
	if state.PinsPresent(g.pin) {
		t.Fatal("pins left after unload")
	}
	g.loader("load", "--group", strconv.Itoa(daemonGID))
	g.expectBlocked("alice's TCP on the new maps, before the control plane", bpf.ReasonNoSession, tcp)

	// Ninety seconds "down".
	const down = 90 * time.Second
	if err := store.ShiftTimes(path, down); err != nil {
		t.Fatal(err)
	}
	cp = startControlPlane(t, g, p, cpOptions{caps: "+bpf", args: args})
	// READY=1 came after the restore: no wait.
	g.expectPass("alice's TCP right after READY=1", bpf.ReasonSession, tcp)
	after := g.snapshot()
	a, b := after[aliceKey], before[aliceKey]
	// The same session, 90 s older, to within the clock reads.
	const tol = 250 * time.Millisecond
	if !stampNear(a.Created, b.Created-uint64(down), tol) || !stampNear(a.Expires, b.Expires-uint64(down), tol) || a.IdleTimeout != b.IdleTimeout {
		t.Fatalf("alice after the reload: %+v, before %+v", a, b)
	}
	// Last seen: at least the downtime ago (the probe just now refreshed
	// it, so compare the lifetime left instead).
	if left := time.Duration(int64(a.Expires - state.Now())); left > time.Hour-down || left < time.Hour-down-time.Minute {
		t.Errorf("alice's lifetime left %v, want about %v", left, time.Hour-down)
	}
	g.expectBlocked("bob's UDP: idle 30 s, down 90 s", bpf.ReasonNoSession, udp)
	g.expectBlocked("the compat session: the default 60 s idle, down 90 s", bpf.ReasonNoSession, compatTCP)

	// Revoked, reloaded: stays revoked.
	agent = agentv1.NewAgentServiceClient(cp.dial(p.controller))
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"}); err != nil {
		t.Fatal(err)
	}
	g.expectBlocked("alice's TCP after the logout", bpf.ReasonNoSession, tcp)
	if err := cp.kill(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g.loader("unload")
	g.loader("load", "--group", strconv.Itoa(daemonGID))
	cp = startControlPlane(t, g, p, cpOptions{caps: "+bpf", args: args})
	g.expectBlocked("alice's TCP after the logout and a reload", bpf.ReasonNoSession, tcp)
	if n := len(g.snapshot()); n != 0 {
		t.Fatalf("%d sessions restored after everything expired or was revoked", n)
	}
}

func (g *gateway) snapshot() map[state.Key]state.Session {
	g.t.Helper()
	m, err := state.Open(g.pin, state.OpenOptions{})
	if err != nil {
		g.t.Fatal(err)
	}
	defer m.Close()
	out := map[state.Key]state.Session{}
	for s, err := range m.Sessions() {
		if err != nil {
			g.t.Fatal(err)
		}
		out[s.Key] = s
	}
	return out
}

func stampNear(a, b uint64, tol time.Duration) bool {
	d := time.Duration(int64(a - b))
	return d < tol && d > -tol
}
