package e2e

import (
	"context"
	"fmt"
	"net"
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

// spoofWait is how long a test waits for a packet that must not arrive.
const spoofWait = time.Second

// mac returns the hardware address of an interface in a namespace.
func mac(t *testing.T, ns *tu.Netns, iface string) net.HardwareAddr {
	t.Helper()
	var hw net.HardwareAddr
	if err := ns.Do(func() error {
		ifc, err := net.InterfaceByName(iface)
		if err == nil {
			hw = ifc.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return hw
}

// counted runs send and fails t unless the reason's counter moved.
func (g *gateway) counted(what string, reason bpf.Reason, send func()) {
	g.t.Helper()
	before := g.stats()
	send()
	if after := g.stats(); after[reason].Packets == before[reason].Packets {
		g.t.Fatalf("%s: no packet counted as %v", what, reason)
	}
}

// Anyone on the public side can write the controller's address into a
// source field. The bypass for the controller's connections to the agent
// must take such a packet to the gateway's own gRPC port and nowhere else.
func TestDataPathControllerBypassIsLocal(t *testing.T) {
	for _, fam := range []struct {
		name                 string
		ctl, svc, gwPub, cli netip.Addr
	}{
		{"ipv4", tu.ControllerV4, tu.ServiceAV4, tu.GatewayPubV4, tu.ClientV4},
		{"ipv6", tu.ControllerV6, tu.ServiceAV6, tu.GatewayPubV6, tu.ClientV6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			g := newGateway(t, "load", "-c", fam.ctl.String())
			// The spoof arrives from the side opposite the controller's
			// route, which strict reverse-path filtering would refuse on
			// its own; the filter must refuse it without that help.
			g.Gateway.Run(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.pub0.rp_filter=0")
			var ln net.Listener
			if err := g.Gateway.Do(func() (err error) {
				ln, err = net.Listen("tcp", netip.AddrPortFrom(fam.gwPub, 50001).String())
				return err
			}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })

			client := g.Client.OpenLink(t, "cli0")
			private := g.Private.OpenLink(t, "srv0") // where the controller and the services are
			gwMAC := mac(t, g.Gateway, tu.PublicIface)
			from := netip.AddrPortFrom(fam.ctl, 40001)

			// The gateway's listener gets the SYN: its SYN-ACK goes to the
			// controller's address, on the private side. (The handshake
			// cannot complete: the real controller never sent the SYN.)
			g.counted("spoofed controller SYN to the gateway", bpf.ReasonController, func() {
				client.Send(t, gwMAC, tu.TCPPacket(from, netip.AddrPortFrom(fam.gwPub, 50001), tu.TCPSyn, 64))
				if !private.Expect(spoofWait, func(p tu.Packet) bool {
					sp, dp, fl, ok := p.TCPPorts()
					return ok && p.Src == fam.gwPub && p.Dst == fam.ctl && sp == 50001 && dp == 40001 && fl == tu.TCPSyn|tu.TCPAck
				}) {
					t.Fatal("no SYN-ACK from the gateway's gRPC listener to the controller")
				}
			})

			// The same SYN to a protected host is dropped and never
			// reaches the private side.
			g.counted("spoofed controller SYN to a protected host", bpf.ReasonNoSession, func() {
				client.Send(t, gwMAC, tu.TCPPacket(from, netip.AddrPortFrom(fam.svc, 50001), tu.TCPSyn, 64))
				if private.Expect(spoofWait, func(p tu.Packet) bool {
					_, dp, _, ok := p.TCPPorts()
					return ok && p.Src == fam.ctl && p.Dst == fam.svc && dp == 50001
				}) {
					t.Fatal("a SYN from the controller's address reached a protected host")
				}
			})
		})
	}
}

// Neighbour discovery passes only as RFC 4861 lets a receiver accept it:
// hop limit 255 and a destination on the link. A routable solicitation or
// advertisement (hop limit 64, or a protected host's global address) must
// not be forwarded to the private side, and neighbour discovery on the
// public link must keep working.
func TestDataPathNeighbourDiscovery(t *testing.T) {
	g := newGateway(t, "load")
	client := g.Client.OpenLink(t, "cli0")
	private := g.Private.OpenLink(t, "srv0")
	gwMAC := mac(t, g.Gateway, tu.PublicIface)
	ns := func(dst, target netip.Addr, hop uint8) []byte {
		return tu.ICMPv6Packet(tu.ClientV6, dst, hop, tu.NDPNeighbourSolicitation, 0, tu.NeighbourSolicitation(target, client.MAC))
	}
	na := func(dst netip.Addr, hop uint8) []byte {
		return tu.ICMPv6Packet(tu.ClientV6, dst, hop, tu.NDPNeighbourAdvertisement, 0, tu.NeighbourAdvertisement(tu.ClientV6, client.MAC))
	}
	reachedService := func(p tu.Packet) bool {
		return p.Proto == tu.ProtoICMPv6 && p.Dst == tu.ServiceAV6 && len(p.L4) > 0 &&
			(p.L4[0] == tu.NDPNeighbourSolicitation || p.L4[0] == tu.NDPNeighbourAdvertisement)
	}
	for _, c := range []struct {
		name string
		pkt  []byte
	}{
		{"advertisement, hop limit 64, to a protected host", na(tu.ServiceAV6, 64)},
		{"solicitation, hop limit 64, to a protected host", ns(tu.ServiceAV6, tu.ServiceAV6, 64)},
		{"advertisement, hop limit 255, to a protected host", na(tu.ServiceAV6, 255)},
		{"solicitation, hop limit 255, to a protected host", ns(tu.ServiceAV6, tu.ServiceAV6, 255)},
	} {
		g.counted(c.name, bpf.ReasonUnsupportedL4, func() {
			client.Send(t, gwMAC, c.pkt)
			if private.Expect(spoofWait, reachedService) {
				t.Fatalf("%s: reached the private side", c.name)
			}
		})
	}

	// A unicast solicitation for the gateway's global address (as
	// neighbour unreachability detection sends) is answered.
	advertisesGateway := func(p tu.Packet) bool {
		return p.Proto == tu.ProtoICMPv6 && p.Src == tu.GatewayPubV6 && p.Dst == tu.ClientV6 && p.HopLimit == 255 &&
			len(p.L4) >= 24 && p.L4[0] == tu.NDPNeighbourAdvertisement && netip.AddrFrom16([16]byte(p.L4[8:24])) == tu.GatewayPubV6
	}
	g.counted("unicast solicitation for the gateway", bpf.ReasonNDP, func() {
		client.Send(t, gwMAC, ns(tu.GatewayPubV6, tu.GatewayPubV6, 255))
		if !client.Expect(spoofWait, advertisesGateway) {
			t.Fatal("the gateway did not answer a unicast solicitation for its address")
		}
	})
	g.counted("unicast solicitation for the gateway, hop limit 64", bpf.ReasonUnsupportedL4, func() {
		client.Send(t, gwMAC, ns(tu.GatewayPubV6, tu.GatewayPubV6, 64))
		if client.Expect(spoofWait, advertisesGateway) {
			t.Fatal("a solicitation with hop limit 64 was answered")
		}
	})

	// From empty neighbour caches, IPv6 through a session: both sides
	// resolve each other across the filter.
	g.Client.Run(t, "ip", "-6", "neigh", "flush", "dev", "cli0")
	g.Gateway.Run(t, "ip", "-6", "neigh", "flush", "dev", tu.PublicIface)
	svc := netip.AddrPortFrom(tu.ServiceAV6, 8080)
	g.Serve(t, svc)
	g.grant(state.Session{Key: tcpKey(tu.ClientV6, tu.ServiceAV6, 8080), User: "alice", IdleTimeout: time.Minute})
	g.counted("neighbour discovery for a session", bpf.ReasonNDP, func() {
		g.expectPass("TCP over IPv6 through a session", bpf.ReasonSession, func() error {
			return g.TCP(tu.ClientV6, svc, probeTimeout)
		})
	})
	dynamicNeighbour(t, g.Client, tu.GatewayPubV6)
	dynamicNeighbour(t, g.Gateway, tu.ClientV6)
}
