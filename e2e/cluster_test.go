package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

const (
	tcpProto = agentv1.Protocol_PROTOCOL_TCP
	udpProto = agentv1.Protocol_PROTOCOL_UDP
)

// haveKey fails t unless every gateway's maps hold k (want true) or none
// does (want false), read from the pins at once, without waiting.
func (c *cluster) haveKey(what string, k state.Key, want bool) {
	c.t.Helper()
	for _, g := range c.gws {
		if got := g.sessionKeys()[k]; got != want {
			c.t.Fatalf("%s: %s holds %v: %v, want %v", what, g.name, k, got, want)
		}
	}
}

// agree waits until every gateway holds k or none does, and returns which:
// for a write whose outcome the store left unknown (it timed out without a
// quorum and may commit once the quorum is back), agreement is what must
// hold. The gateways apply the store's log on their own, so it may take a
// moment.
func (c *cluster) agree(what string, k state.Key) bool {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		held := 0
		for _, g := range c.gws {
			if g.sessionKeys()[k] {
				held++
			}
		}
		if held == 0 || held == len(c.gws) {
			return held != 0
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: %d of %d gateways hold %v after 10 s", what, held, len(c.gws), k)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A grant through A passes on A, B and C, and a revoke through C closes
// all three: real packets through each gateway's XDP, right after the
// acknowledgement, with no wait in between.
func TestClusterGrantAndRevokeEverywhere(t *testing.T) {
	c := newCluster(t)
	a, cgw := c.gws[0], c.gws[2]
	svc := netip.AddrPortFrom(tu.ServiceAV4, 9000)
	a.Serve(t, svc)
	tcp := func(g *clusterGateway) func() error {
		return func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) }
	}
	key := tcpKey(tu.ClientV4, svc.Addr(), svc.Port())
	c.each(func(g *clusterGateway) {
		g.expectBlocked(g.name+": TCP before the login", bpf.ReasonNoSession, tcp(g))
	})

	if err := a.login(rpcCtx(t), "alice", tu.ClientV4, svc, tcpProto, 0); err != nil {
		t.Fatal(err)
	}
	// OK means applied on every live gateway: the maps hold it now.
	c.haveKey("right after the login through gw-a", key, true)
	// C first: the gateway farthest from the grant gets the least time.
	for _, i := range []int{2, 1, 0} {
		c.activate(i)
		g := c.gws[i]
		g.expectPass(g.name+": TCP after the login through gw-a", bpf.ReasonSession, tcp(g))
	}
	for _, g := range c.gws {
		list, err := g.agent.ListSessions(rpcCtx(t), &agentv1.ListSessionsRequest{User: "alice"})
		if err != nil || len(list.GetSessions()) != 1 || list.GetSessions()[0].GetDstPort() != 9000 {
			t.Fatalf("%s: ListSessions(alice): %v %v", g.name, list, err)
		}
	}

	if n, err := cgw.logout(rpcCtx(t), "alice"); err != nil || n != 1 {
		t.Fatalf("logout through gw-c: %d %v", n, err)
	}
	c.haveKey("right after the logout through gw-c", key, false)
	for _, i := range []int{0, 1, 2} {
		c.activate(i)
		g := c.gws[i]
		g.expectBlocked(g.name+": TCP after the logout through gw-c", bpf.ReasonNoSession, tcp(g))
	}
}

// The control case: the same cluster and probes with --store none. A
// grant through A passes on A only, and B and C drop the session's
// packets for want of it: what every test here would see if grants did
// not reach the other gateways.
func TestClusterControlWithoutStore(t *testing.T) {
	c := newClusterWith(t, true)
	a := c.gws[0]
	svc := netip.AddrPortFrom(tu.ServiceAV4, 9000)
	a.Serve(t, svc)
	if err := a.login(rpcCtx(t), "alice", tu.ClientV4, svc, tcpProto, 0); err != nil {
		t.Fatal(err)
	}
	c.each(func(g *clusterGateway) {
		probe := func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) }
		if g == a {
			g.expectPass("gw-a, where the grant went", bpf.ReasonSession, probe)
			return
		}
		g.expectBlocked(g.name+" without a store", bpf.ReasonNoSession, probe)
	})
}

// A client streams 1000 UDP datagrams a second through A; its route
// moves to B, as a VRRP failover or an ECMP change would, and the stream
// goes on through B. The streaming session has a 3 s idle timeout and
// streams through A for longer than that before the move: B keeps it only
// because A's activity reaches B through the store. 20 idle sessions of
// another user must pass through B too.
func TestClusterFailoverKeepsStreaming(t *testing.T) {
	c := newCluster(t)
	a, b := c.gws[0], c.gws[1]
	stream := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	server := a.Serve(t, stream)
	if err := a.login(rpcCtx(t), "alice", tu.ClientV4, stream, udpProto, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	var idle []netip.AddrPort
	for i := range 20 {
		dst := netip.AddrPortFrom(tu.ServiceAV4, uint16(7000+i))
		a.Serve(t, dst)
		if err := a.login(rpcCtx(t), fmt.Sprintf("bob%d", i), tu.OtherClientV4, dst, udpProto, 0); err != nil {
			t.Fatal(err)
		}
		idle = append(idle, dst)
	}

	const pps = 1000
	sctx, stop := context.WithCancel(context.Background())
	defer stop()
	sent := make(chan uint64, 1)
	go func() {
		n, err := a.Stream(sctx, tu.ClientV4, stream, pps)
		if err != nil {
			t.Error(err)
		}
		sent <- n
	}()
	time.Sleep(4 * time.Second) // longer than the idle timeout
	passedA := a.stats()[bpf.ReasonSession].Packets
	if passedA < pps {
		t.Fatalf("only %d packets passed gw-a in 4 s", passedA)
	}
	beforeB := b.stats()[bpf.ReasonSession].Packets
	moved := time.Now()
	c.activate(1)
	time.Sleep(2 * time.Second)
	stop()
	n := <-sent
	streamedB := time.Since(moved)
	got := server.WaitReceived(n, 3*time.Second)
	viaB := b.stats()[bpf.ReasonSession].Packets - beforeB
	lostSessions := 0
	for i, dst := range idle {
		if err := b.UDP(tu.OtherClientV4, dst, probeTimeout); err != nil {
			t.Errorf("bob%d's session to %s does not pass gw-b after the move: %v", i, dst, err)
			lostSessions++
		}
	}
	if err := b.UDP(tu.ClientV4, stream, probeTimeout); err != nil {
		t.Errorf("alice's streaming session does not pass gw-b after the move: %v", err)
		lostSessions++
	}
	t.Logf("failover A→B at %d datagrams/s: %d sent, %d received, %d lost; %d passed gw-b in the %v after the move; %d of 21 sessions lost",
		pps, n, got, n-got, viaB, streamedB.Round(time.Millisecond), lostSessions)
	if viaB < pps {
		t.Fatalf("only %d datagrams passed gw-b after the move: the stream did not move or B dropped it", viaB)
	}
	if got != n {
		t.Errorf("%d of %d datagrams lost across the failover", n-got, n)
	}
	if dropped := b.stats()[bpf.ReasonNoSession].Packets; dropped != 0 {
		t.Errorf("gw-b dropped %d packets for want of a session", dropped)
	}
}

// Gateway B reboots: its daemons are killed, its pins removed (the data
// path goes with them) and its interface goes down; then the loader runs
// again, as at boot, and the daemons start. When the control plane
// reports READY=1, every store session is in B's maps, and revoked ones
// are not: traffic that ECMP or VRRP sends to B from then on passes.
func TestClusterRebootRestoresSessions(t *testing.T) {
	c := newCluster(t)
	a, b, cgw := c.gws[0], c.gws[1], c.gws[2]
	const n, revoked = 100, 10
	keys := make([]state.Key, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 8)
	for i := range n {
		src := tu.ClientV4
		if i%2 == 1 {
			src = tu.OtherClientV4
		}
		dst := netip.AddrPortFrom(tu.ServiceAV4, uint16(10000+i))
		keys[i] = udpKey(src, dst.Addr(), dst.Port())
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			errs <- a.login(rpcCtx(t), fmt.Sprintf("u%d", i), src, dst, udpProto, 0)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := n - revoked; i < n; i++ {
		if k, err := cgw.logout(rpcCtx(t), fmt.Sprintf("u%d", i)); err != nil || k != 1 {
			t.Fatalf("logout u%d: %d %v", i, k, err)
		}
	}
	probe := []int{0, 1, n - revoked - 1, n - 1} // three live, one revoked
	for _, i := range probe {
		a.Serve(t, netip.AddrPortFrom(keys[i].Dst, keys[i].Port))
	}

	c.activate(1)
	for _, i := range probe[:3] {
		if err := b.UDP(keys[i].Src, netip.AddrPortFrom(keys[i].Dst, keys[i].Port), probeTimeout); err != nil {
			t.Fatalf("before the reboot, session %d does not pass gw-b: %v", i, err)
		}
	}

	// The reboot. bpffs is memory: what was pinned is gone, and the XDP
	// link with it.
	c.stopDaemons(b)
	b.Gateway.Run(t, "ip", "link", "set", tu.PublicIface, "down")
	if err := os.RemoveAll(b.pin); err != nil {
		t.Fatal(err)
	}
	// bpffs frees a removed pin's inode after an RCU grace period, so the
	// link's release is asynchronous: a loaded machine takes a moment.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		out := b.Gateway.Run(t, "ip", "link", "show", tu.PublicIface)
		if !strings.Contains(out, "xdp") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("XDP still attached 5 s after the pins were removed:\n%s", out)
		}
	}
	b.loader("load", "--group", fmt.Sprint(daemonGID))
	b.Gateway.Run(t, "ip", "link", "set", tu.PublicIface, "up")
	if got := len(b.sessionKeys()); got != 0 {
		t.Fatalf("a fresh load holds %d sessions", got)
	}
	start := time.Now()
	c.startDaemons(b) // returns at READY=1
	ready := time.Since(start)

	have := b.sessionKeys()
	missing, resurrected := 0, 0
	for i, k := range keys {
		switch {
		case i < n-revoked && !have[k]:
			missing++
		case i >= n-revoked && have[k]:
			resurrected++
		}
	}
	t.Logf("gw-b ready %v after its control plane started: %d of %d sessions restored, %d missing, %d revoked ones back",
		ready.Round(time.Millisecond), len(have), n-revoked, missing, resurrected)
	if missing != 0 || resurrected != 0 || len(have) != n-revoked {
		t.Fatalf("at READY=1 gw-b holds %d sessions: %d missing, %d revoked ones back", len(have), missing, resurrected)
	}
	for _, i := range probe[:3] {
		b.expectPass(fmt.Sprintf("session %d through gw-b after the reboot", i), bpf.ReasonSession, func() error {
			return b.UDP(keys[i].Src, netip.AddrPortFrom(keys[i].Dst, keys[i].Port), probeTimeout)
		})
	}
	i := probe[3]
	b.expectBlocked("revoked session through gw-b after the reboot", bpf.ReasonNoSession, func() error {
		return b.UDP(keys[i].Src, netip.AddrPortFrom(keys[i].Dst, keys[i].Port), probeTimeout)
	})
	// The rebooted gateway takes part in acknowledgements again: a revoke
	// through it closes the session on the others at once.
	if k, err := b.logout(rpcCtx(t), "u0"); err != nil || k != 1 {
		t.Fatalf("logout through the rebooted gw-b: %d %v", k, err)
	}
	c.haveKey("right after a logout through the rebooted gw-b", keys[0], false)
}

// isUnavailable reports whether err is gRPC's Unavailable.
func isUnavailable(err error) bool { return status.Code(err) == codes.Unavailable }

// One etcd member lost: grants and revokes go on. Two lost: the store has
// no quorum, grants and revokes get Unavailable, and what is in the maps
// is still enforced on every gateway. Members back: the gateways resync
// and no revoked session comes back. Then gateway C alone is cut off from
// the store: a revoke through A still completes, C keeps enforcing its
// last state, and when the partition heals C drops the revoked session.
func TestClusterEtcdQuorumAndPartition(t *testing.T) {
	c := newCluster(t)
	a, b, cgw := c.gws[0], c.gws[1], c.gws[2]
	svc := netip.AddrPortFrom(tu.ServiceAV4, 9000)
	a.Serve(t, svc)
	udp := netip.AddrPortFrom(tu.ServiceAV4, 9001)
	kAlice := tcpKey(tu.ClientV4, svc.Addr(), svc.Port())
	kBob := udpKey(tu.ClientV4, udp.Addr(), udp.Port())
	kCarol := udpKey(tu.OtherClientV4, udp.Addr(), udp.Port())
	revokedKeys := []state.Key{kBob, kCarol}

	for _, u := range []struct {
		user string
		src  netip.Addr
		dst  netip.AddrPort
		p    agentv1.Protocol
	}{{"alice", tu.ClientV4, svc, tcpProto}, {"bob", tu.ClientV4, udp, udpProto}} {
		if err := a.login(rpcCtx(t), u.user, u.src, u.dst, u.p, 0); err != nil {
			t.Fatal(err)
		}
	}
	if k, err := b.logout(rpcCtx(t), "bob"); err != nil || k != 1 {
		t.Fatalf("logout bob: %d %v", k, err)
	}

	// One member down: a quorum of two remains.
	c.etcd.Kill(0)
	c.etcd.WaitHealthy(t)
	if err := b.login(rpcCtx(t), "carol", tu.OtherClientV4, udp, udpProto, 0); err != nil {
		t.Fatalf("grant with one etcd member down: %v", err)
	}
	c.haveKey("grant with one etcd member down", kCarol, true)
	if k, err := cgw.logout(rpcCtx(t), "carol"); err != nil || k != 1 {
		t.Fatalf("revoke with one etcd member down: %d %v", k, err)
	}
	c.haveKey("revoke with one etcd member down", kCarol, false)

	// Two down: no quorum.
	c.etcd.Kill(1)
	t0 := time.Now()
	err := a.login(rpcCtx(t), "dave", tu.OtherClientV4, svc, tcpProto, 0)
	tookGrant := time.Since(t0)
	if !isUnavailable(err) {
		t.Fatalf("grant without quorum: %v, want Unavailable", err)
	}
	t0 = time.Now()
	_, err = b.logout(rpcCtx(t), "alice")
	tookRevoke := time.Since(t0)
	if !isUnavailable(err) {
		t.Fatalf("revoke without quorum: %v, want Unavailable", err)
	}
	t.Logf("without quorum: grant refused in %v, revoke in %v", tookGrant.Round(time.Millisecond), tookRevoke.Round(time.Millisecond))
	for _, g := range c.gws {
		g.waitMetric("aegis_store_up", 0, 20*time.Second)
	}
	c.each(func(g *clusterGateway) {
		g.expectPass(g.name+": established session without quorum", bpf.ReasonSession, func() error {
			return g.TCP(tu.ClientV4, svc, probeTimeout)
		})
	})

	// Quorum back: every gateway resyncs.
	c.etcd.Restart(0)
	c.etcd.Restart(1)
	c.etcd.WaitHealthy(t)
	for _, g := range c.gws {
		g.waitMetric("aegis_store_up", 1, 30*time.Second)
	}
	for _, k := range revokedKeys {
		c.haveKey("revoked before the outage, after the quorum came back", k, false)
	}
	// A write etcd could not commit in time may still be in the log of
	// the member that took it, and commit once the quorum is back: the
	// refusal says "not confirmed", not "never written". What must hold
	// is that the gateways agree. That is so for alice's revoke (refused
	// after the write timed out) and for dave's grant.
	aliceKept := c.agree("alice, whose revoke was refused without quorum", kAlice)
	kDave := tcpKey(tu.OtherClientV4, svc.Addr(), svc.Port())
	daveCommitted := c.agree("the grant refused without quorum", kDave)
	t.Logf("after the quorum came back: the refused revoke took effect %v, the refused grant %v", !aliceKept, daveCommitted)
	if !aliceKept { // the partition below needs her session
		if err := a.login(rpcCtx(t), "alice", tu.ClientV4, svc, tcpProto, 0); err != nil {
			t.Fatalf("grant alice again: %v", err)
		}
		c.haveKey("alice granted again", kAlice, true)
	}
	erin := netip.AddrPortFrom(tu.ServiceAV4, 9002)
	kErin := udpKey(tu.OtherClientV4, erin.Addr(), erin.Port())
	if err := cgw.login(rpcCtx(t), "erin", tu.OtherClientV4, erin, udpProto, 0); err != nil {
		t.Fatalf("grant after the quorum came back: %v", err)
	}
	c.haveKey("grant after the quorum came back", kErin, true)

	// C alone loses the store; the others go on without it.
	partition(t, cgw.Gateway, c.etcd)
	t0 = time.Now()
	if k, err := a.logout(rpcCtx(t), "alice"); err != nil || k != 1 {
		t.Fatalf("revoke through gw-a while gw-c is cut off: %d %v", k, err)
	}
	t.Logf("revoke with gw-c cut off acknowledged in %v", time.Since(t0).Round(time.Millisecond))
	revokedKeys = append(revokedKeys, kAlice)
	// Through C itself nothing can be written while it is cut off.
	frank := netip.AddrPortFrom(tu.ServiceAV4, 9003)
	if err := cgw.login(rpcCtx(t), "frank", tu.OtherClientV4, frank, tcpProto, 0); !isUnavailable(err) {
		t.Fatalf("grant through the cut off gw-c: %v, want Unavailable", err)
	}
	cgw.waitMetric("aegis_store_up", 0, 15*time.Second)
	for _, g := range []*clusterGateway{a, b} {
		if g.sessionKeys()[kAlice] {
			t.Fatalf("%s still holds alice's session after the revoke", g.name)
		}
	}
	c.activate(2)
	cgw.expectPass("gw-c, cut off, enforces its last state", bpf.ReasonSession, func() error {
		return cgw.TCP(tu.ClientV4, svc, probeTimeout)
	})
	c.activate(0)

	heal(t, cgw.Gateway)
	healed := time.Now()
	for cgw.sessionKeys()[kAlice] {
		if time.Since(healed) > 30*time.Second {
			t.Fatalf("gw-c still holds the revoked session 30 s after the partition healed\n%s", lastLines(cgw.cp.out.String(), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("gw-c dropped the session revoked during its partition %v after the heal", time.Since(healed).Round(time.Millisecond))
	resurrected := 0
	for _, g := range c.gws {
		have := g.sessionKeys()
		for _, k := range revokedKeys {
			if have[k] {
				t.Errorf("%s: revoked session %v is back", g.name, k)
				resurrected++
			}
		}
		if !have[kErin] {
			t.Errorf("%s lost erin's session", g.name)
		}
	}
	t.Logf("%d revoked sessions resurrected", resurrected)
	c.activate(2)
	cgw.expectBlocked("gw-c after the heal", bpf.ReasonNoSession, func() error {
		return cgw.TCP(tu.ClientV4, svc, probeTimeout)
	})
}

// partition drops every packet between ns and the etcd members, both
// ways, as a cut link would: no resets, no ICMP errors.
func partition(t *testing.T, ns *tu.Netns, e *tu.Etcd) {
	t.Helper()
	var addrs []string
	for _, ep := range e.Endpoints() {
		host := strings.TrimPrefix(ep, "https://")
		host = host[:strings.LastIndex(host, ":")]
		addrs = append(addrs, host)
	}
	set := strings.Join(addrs, ", ")
	rules := fmt.Sprintf(`table inet aegis_test_partition {
	chain in { type filter hook input priority 0; ip saddr { %s } drop; }
	chain out { type filter hook output priority 0; ip daddr { %s } drop; }
}
`, set, set)
	cmd := ns.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
}

func heal(t *testing.T, ns *tu.Netns) {
	t.Helper()
	ns.Run(t, "nft", "delete", "table", "inet", "aegis_test_partition")
}
