package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

const probeTimeout = 400 * time.Millisecond

// expectPass fails t unless probe succeeds and the reason's counter moved.
func (g *gateway) expectPass(what string, reason bpf.Reason, probe func() error) {
	g.t.Helper()
	before := g.stats()
	if err := probe(); err != nil {
		g.t.Fatalf("%s: blocked (%v), want it to pass", what, err)
	}
	if after := g.stats(); after[reason].Packets == before[reason].Packets {
		g.t.Fatalf("%s: passed but no packet was counted as %v", what, reason)
	}
}

// expectBlocked fails t unless probe fails and the data path counted a drop
// with the reason: the failure must be the filter's, not the network's.
func (g *gateway) expectBlocked(what string, reason bpf.Reason, probe func() error) {
	g.t.Helper()
	before := g.stats()
	if err := probe(); err == nil {
		g.t.Fatalf("%s: passed, want it blocked", what)
	}
	if after := g.stats(); after[reason].Packets == before[reason].Packets {
		g.t.Fatalf("%s: failed, but the data path counted no %v drop", what, reason)
	}
}

func (g *gateway) grant(s state.Session) {
	g.t.Helper()
	now := state.Now()
	if s.LastSeen == 0 {
		s.LastSeen = now
	}
	s.Created = now
	if err := g.maps().Grant(s); err != nil {
		g.t.Fatal(err)
	}
}

func tcpKey(src, dst netip.Addr, port uint16) state.Key {
	return state.Key{Src: src, Dst: dst, Port: port, Proto: state.TCP}
}

func udpKey(src, dst netip.Addr, port uint16) state.Key {
	return state.Key{Src: src, Dst: dst, Port: port, Proto: state.UDP}
}

// dynamicNeighbour checks that ns learned addr by ARP/NDP: an entry with a
// MAC address that is not PERMANENT (static).
func dynamicNeighbour(t *testing.T, ns *tu.Netns, addr netip.Addr) {
	t.Helper()
	out := ns.Neighbours(t)
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, addr.String()+" ") {
			if strings.Contains(line, "PERMANENT") || !strings.Contains(line, "lladdr") {
				t.Fatalf("neighbour %s is not a learned entry: %q", addr, line)
			}
			return
		}
	}
	t.Fatalf("no neighbour entry for %s in %s:\n%s", addr, ns.Name, out)
}

func TestDataPathEndToEnd(t *testing.T) {
	for _, fam := range []struct {
		name                        string
		client, other, ctl, svcA, b netip.Addr
		gwPub                       netip.Addr
		mgmtRule                    string
		neighbourReason             bpf.Reason
	}{
		{"ipv4", tu.ClientV4, tu.OtherClientV4, tu.ControllerV4, tu.ServiceAV4, tu.ServiceBV4, tu.GatewayPubV4, "192.0.2.11/32,tcp/2222", bpf.ReasonARP},
		{"ipv6", tu.ClientV6, tu.OtherClientV6, tu.ControllerV6, tu.ServiceAV6, tu.ServiceBV6, tu.GatewayPubV6, "2001:db8:1::11/128,tcp/2222", bpf.ReasonNDP},
	} {
		t.Run(fam.name, func(t *testing.T) {
			g := newGateway(t, "load", "-c", fam.ctl.String(), "--allow", fam.mgmtRule)
			svcA := netip.AddrPortFrom(fam.svcA, 8080)
			svcB := netip.AddrPortFrom(fam.b, 8080)
			login := netip.AddrPortFrom(fam.ctl, 443)
			mgmt := netip.AddrPortFrom(fam.svcA, 2222)
			for _, a := range []netip.AddrPort{svcA, svcB, login, mgmt} {
				g.Serve(t, a)
			}
			tcp := func(src netip.Addr, dst netip.AddrPort) func() error {
				return func() error { return g.TCP(src, dst, probeTimeout) }
			}
			udp := func(src netip.Addr, dst netip.AddrPort) func() error {
				return func() error { return g.UDP(src, dst, probeTimeout) }
			}

			// Users can always reach the controller's login page.
			g.expectPass("login port without a session", bpf.ReasonController, tcp(fam.client, login))
			// Everything else is dropped by default.
			g.expectBlocked("TCP to service A before login", bpf.ReasonNoSession, tcp(fam.client, svcA))
			g.expectBlocked("UDP to service A before login", bpf.ReasonNoSession, udp(fam.client, svcA))
			// The management allow rule covers one client and one port.
			g.expectPass("management port from the allowed client", bpf.ReasonAllowlist, tcp(fam.other, mgmt))
			g.expectBlocked("management port from another client", bpf.ReasonNoSession, tcp(fam.client, mgmt))

			g.grant(state.Session{Key: tcpKey(fam.client, fam.svcA, 8080), User: "alice", IdleTimeout: time.Minute})
			g.expectPass("TCP to service A after the grant", bpf.ReasonSession, tcp(fam.client, svcA))
			g.expectBlocked("UDP to service A: other protocol", bpf.ReasonNoSession, udp(fam.client, svcA))
			g.expectBlocked("TCP to service B: other service", bpf.ReasonNoSession, tcp(fam.client, svcB))
			g.expectBlocked("TCP to service A from another client", bpf.ReasonNoSession, tcp(fam.other, svcA))

			// Neighbour resolution went through the XDP program both ways.
			dynamicNeighbour(t, g.Client, fam.gwPub)
			dynamicNeighbour(t, g.Gateway, fam.client)
			if g.stats()[fam.neighbourReason].Packets == 0 {
				t.Fatalf("no %v packet counted", fam.neighbourReason)
			}
		})
	}
}

// Idle and lifetime expiry stop a flow on time in the data path itself: no
// reaper runs here.
func TestExpiryWithoutReaper(t *testing.T) {
	g := newGateway(t, "load")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	g.Serve(t, svc)
	udp := func() error { return g.UDP(tu.ClientV4, svc, probeTimeout) }

	t.Run("idle", func(t *testing.T) {
		g.t = t
		g.grant(state.Session{Key: udpKey(tu.ClientV4, tu.ServiceAV4, 5353), User: "alice", IdleTimeout: time.Second})
		// Traffic every 300 ms keeps the session alive past its timeout.
		for end := time.Now().Add(2500 * time.Millisecond); time.Now().Before(end); time.Sleep(300 * time.Millisecond) {
			g.expectPass("UDP within the idle timeout", bpf.ReasonSession, udp)
		}
		time.Sleep(1300 * time.Millisecond)
		g.expectBlocked("UDP after 1.3 s idle with a 1 s timeout", bpf.ReasonExpired, udp)
		if _, err := g.maps().Lookup(udpKey(tu.ClientV4, tu.ServiceAV4, 5353)); err != nil {
			t.Fatalf("the expired session should still be in the map (no reaper): %v", err)
		}
	})

	t.Run("lifetime", func(t *testing.T) {
		g.t = t
		const lifetime = 1500 * time.Millisecond
		start := state.Now()
		g.grant(state.Session{Key: udpKey(tu.ClientV4, tu.ServiceAV4, 5353), User: "alice",
			IdleTimeout: time.Hour, Expires: start + uint64(lifetime)})
		var firstBlocked time.Duration
		for {
			err := udp()
			elapsed := time.Duration(state.Now() - start)
			if err != nil {
				firstBlocked = elapsed
				break
			}
			if elapsed > lifetime+time.Second {
				t.Fatalf("still passing %v after the grant, lifetime %v", elapsed, lifetime)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// The last exchange that passed started before the lifetime ended;
		// the first refused one ended within one probe of it.
		if firstBlocked < lifetime || firstBlocked > lifetime+probeTimeout+200*time.Millisecond {
			t.Fatalf("first refused exchange ended %v after the grant; lifetime %v", firstBlocked, lifetime)
		}
		g.expectBlocked("UDP after the lifetime", bpf.ReasonExpired, udp)
	})
}

func TestMonitorMode(t *testing.T) {
	g := newGateway(t, "load", "--monitor")
	svc := netip.AddrPortFrom(tu.ServiceBV4, 8080)
	g.Serve(t, svc)
	g.Serve(t, netip.AddrPortFrom(tu.ServiceBV6, 8080))
	g.expectPass("TCP without a session in monitor mode", bpf.ReasonMonitor, func() error {
		return g.TCP(tu.ClientV4, svc, probeTimeout)
	})
	g.expectPass("UDP without a session in monitor mode", bpf.ReasonMonitor, func() error {
		return g.UDP(tu.ClientV6, netip.AddrPortFrom(tu.ServiceBV6, 8080), probeTimeout)
	})
	// Leaving monitor mode is a config rewrite; enforcement resumes at once.
	if out := g.loader("load"); !strings.Contains(out, "wrote config") {
		t.Fatalf("reload without --monitor: %s", out)
	}
	g.expectBlocked("TCP without a session after monitor mode", bpf.ReasonNoSession, func() error {
		return g.TCP(tu.ClientV4, svc, probeTimeout)
	})
}

// Upgrading the program while a client streams through an established
// session loses no packet and no session, and keeps the maps.
func TestUpgradeUnderTraffic(t *testing.T) {
	g := newGateway(t, "load")
	sink := g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 7000))
	key := udpKey(tu.ClientV4, tu.ServiceAV4, 7000)
	g.grant(state.Session{Key: key, User: "alice", IdleTimeout: time.Minute})
	for i := range 50 { // other sessions that must survive too
		g.grant(state.Session{Key: udpKey(tu.ClientV4, tu.ServiceBV4, uint16(10000+i)), User: "bob", IdleTimeout: time.Hour})
	}
	statusBefore := g.loader("status", "--json")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	type streamResult struct {
		sent uint64
		err  error
	}
	done := make(chan streamResult, 1)
	before := g.stats()
	go func() {
		n, err := g.Stream(ctx, tu.ClientV4, sink.Addr, 2000)
		done <- streamResult{n, err}
	}()

	time.Sleep(800 * time.Millisecond)
	if out := g.run(bin("aegis-loader-next"), "load"); !strings.Contains(out, "upgraded "+tu.PublicIface) {
		t.Fatalf("upgrade to the next build: %s", out)
	}
	time.Sleep(800 * time.Millisecond)
	if out := g.loader("load"); !strings.Contains(out, "upgraded "+tu.PublicIface) {
		t.Fatalf("upgrade back: %s", out)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	got := sink.WaitReceived(r.sent, 3*time.Second)
	after := g.stats()
	t.Logf("streamed %d datagrams across two program swaps, %d arrived", r.sent, got)
	if r.sent < 4000 {
		t.Fatalf("only %d datagrams sent; the stream did not run", r.sent)
	}
	if got != r.sent {
		t.Fatalf("lost %d of %d datagrams across the upgrade", r.sent-got, r.sent)
	}
	for _, reason := range []bpf.Reason{bpf.ReasonNoSession, bpf.ReasonExpired, bpf.ReasonMalformed} {
		if d := after[reason].Packets - before[reason].Packets; d != 0 {
			t.Fatalf("%d packets dropped as %v during the upgrade", d, reason)
		}
	}
	v4, _, err := g.maps().Count()
	if err != nil || v4 != 51 {
		t.Fatalf("%d sessions after the upgrade, want 51 (%v)", v4, err)
	}
	// Same maps (same kernel ids) before and after.
	ids := regexp.MustCompile(`"id": \d+`)
	if a, b := ids.FindAllString(statusBefore, -1), ids.FindAllString(g.loader("status", "--json"), -1); fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("map ids changed across the upgrade: %v -> %v", a, b)
	}
}

// Jumbo frames: the program is multi-buffer aware, attaches natively to a
// 9000-byte MTU interface, and passes 8000-byte datagrams of a session.
func TestJumboFrames(t *testing.T) {
	topo := tu.NewTopology(t)
	for _, l := range []struct {
		ns  *tu.Netns
		dev string
	}{{topo.Client, "cli0"}, {topo.Gateway, "pub0"}, {topo.Gateway, "priv0"}, {topo.Private, "srv0"}} {
		l.ns.Run(t, "ip", "link", "set", l.dev, "mtu", "9000")
	}
	g := &gateway{Topology: topo, t: t, pin: tu.PinDir(t)}
	g.loader("load", "--mode", "native")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	g.Serve(t, svc)
	big := func() error { return g.UDPSize(tu.ClientV4, svc, 8000, probeTimeout) }
	g.expectBlocked("8000-byte UDP without a session", bpf.ReasonNoSession, big)
	g.grant(state.Session{Key: udpKey(tu.ClientV4, tu.ServiceAV4, 5353), User: "alice", IdleTimeout: time.Minute})
	g.expectPass("8000-byte UDP with a session", bpf.ReasonSession, big)
}
