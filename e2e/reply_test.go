package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/proto/session"
)

// The reply path end to end: aegis_egress on the public interface's tcx
// egress hook records what the gateway and the hosts behind it open, and
// aegis_xdp passes the replies, with real resolvers, web servers and TCP
// stacks on both sides.

// dialIn dials from ns: the socket is created on a thread inside it and
// stays there, whichever goroutine uses it afterwards.
func dialIn(ns *tu.Netns, network string, local netip.AddrPort, remote string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() error {
		d := net.Dialer{Timeout: timeout, KeepAlive: -1}
		if local.IsValid() {
			if strings.HasPrefix(network, "udp") {
				d.LocalAddr = net.UDPAddrFromAddrPort(local)
			} else {
				d.LocalAddr = net.TCPAddrFromAddrPort(local)
			}
		}
		var err error
		c, err = d.Dial(network, remote)
		return err
	})
	return c, err
}

func listenIn(t *testing.T, ns *tu.Netns, addr netip.AddrPort) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// startDNSMasq runs dnsmasq in ns as the public side's resolver: it knows
// one name and nothing else.
func startDNSMasq(t *testing.T, ns *tu.Netns, addr netip.Addr) {
	t.Helper()
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		t.Fatal("dnsmasq is not installed: run scripts/setup.sh")
	}
	cmd := ns.Command("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--user=root", "--pid-file=", "--bind-interfaces", "--listen-address="+addr.String(), "--port=53",
		"--address=/example.test/203.0.113.9")
	out := &tu.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("dnsmasq:\n%s", out.String())
		}
	})
	// Ready once it answers on its own side.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := lookup(ns, addr, time.Second); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dnsmasq does not answer:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lookup resolves example.test's IPv4 address with Go's own resolver,
// from ns, asking server.
func lookup(ns *tu.Netns, server netip.Addr, timeout time.Duration) ([]netip.Addr, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dialIn(ns, network, netip.AddrPort{}, netip.AddrPortFrom(server, 53).String(), timeout)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return r.LookupNetIP(ctx, "ip4", "example.test")
}

// httpGet fetches url from ns.
func httpGet(ns *tu.Netns, url string, timeout time.Duration) (string, error) {
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ns, network, netip.AddrPort{}, addr, timeout)
		},
	}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// The gateway itself resolves a name and fetches a page from the public
// side; without reply tracking both answers are dropped as no_session.
func TestReplyFromGateway(t *testing.T) {
	g := newGateway(t, "load")
	startDNSMasq(t, g.Client, tu.ClientV4)
	ln := listenIn(t, g.Client, netip.AddrPortFrom(tu.ClientV4, 8000))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "hello from the public side")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	dns := func() error {
		addrs, err := lookup(g.Gateway, tu.ClientV4, probeTimeout)
		if err == nil && (len(addrs) != 1 || addrs[0] != netip.MustParseAddr("203.0.113.9")) {
			err = fmt.Errorf("example.test resolved to %v", addrs)
		}
		return err
	}
	web := func() error {
		body, err := httpGet(g.Gateway, "http://192.0.2.10:8000/", probeTimeout)
		if err == nil && body != "hello from the public side" {
			err = fmt.Errorf("body %q", body)
		}
		return err
	}
	g.expectPass("DNS query from the gateway", bpf.ReasonReply, dns)
	g.expectPass("HTTP fetch from the gateway", bpf.ReasonReply, web)
	if n := flowCount(t, g); n == 0 {
		t.Fatal("no flow recorded")
	}

	if out := g.loader("load", "--no-reply-tracking"); !strings.Contains(out, "detached egress pub0") {
		t.Fatalf("load --no-reply-tracking: %s", out)
	}
	g.expectBlocked("DNS query without reply tracking", bpf.ReasonNoSession, dns)
	g.expectBlocked("HTTP fetch without reply tracking", bpf.ReasonNoSession, web)

	// And back on: the path is what made them work.
	g.loader("load")
	g.expectPass("DNS query with reply tracking back", bpf.ReasonReply, dns)
}

func flowCount(t *testing.T, g *gateway) int {
	t.Helper()
	m := g.maps()
	n := 0
	var k, v []byte
	it := m.FlowsV4.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// lineServer accepts TCP connections on ns and echoes lines; conns
// receives each accepted connection.
func lineServer(t *testing.T, ns *tu.Netns, addr netip.AddrPort) <-chan net.Conn {
	t.Helper()
	ln := listenIn(t, ns, addr)
	conns := make(chan net.Conn, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			conns <- c
		}
	}()
	return conns
}

func exchange(c net.Conn, msg string, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != msg+"\n" {
		return fmt.Errorf("got %q", line)
	}
	return nil
}

// A host on the private side talks to a public server through the
// gateway; the server can reach nothing else, and once the flow idles out
// not even that host.
func TestReplyForwardedFromPrivateSide(t *testing.T) {
	g := newGateway(t, "load", "--flow-idle-tcp", "2s")
	public := netip.AddrPortFrom(tu.ClientV4, 8081)
	conns := lineServer(t, g.Client, public)
	g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 8082))
	gwLn := listenIn(t, g.Gateway, netip.AddrPortFrom(tu.GatewayPubV4, 8083))
	go func() {
		for {
			c, err := gwLn.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	var c net.Conn
	var srvSide net.Conn
	g.expectPass("TCP from the private side to a public server", bpf.ReasonReply, func() error {
		var err error
		c, err = dialIn(g.Private, "tcp", netip.AddrPortFrom(tu.ServiceAV4, 0), public.String(), probeTimeout)
		if err != nil {
			return err
		}
		srvSide = <-conns
		go func() { _, _ = io.Copy(srvSide, srvSide) }() // echo
		return exchange(c, "hello", probeTimeout)
	})
	defer c.Close()
	for i := range 5 {
		if err := exchange(c, fmt.Sprintf("line %d", i), probeTimeout); err != nil {
			t.Fatalf("exchange %d: %v", i, err)
		}
	}

	// Unsolicited: the public server, even from the flow's own port, to
	// another port of the private host and to the gateway.
	g.expectBlocked("public server to another port of the private host", bpf.ReasonNoSession, func() error {
		return g.TCP(tu.ClientV4, netip.AddrPortFrom(tu.ServiceAV4, 8082), probeTimeout)
	})
	g.expectBlocked("UDP from the flow's peer port to the private host", bpf.ReasonNoSession, func() error {
		uc, err := dialIn(g.Client, "udp", public, netip.AddrPortFrom(tu.ServiceAV4, 8082).String(), probeTimeout)
		if err != nil {
			return err
		}
		defer uc.Close()
		return exchange(uc, "x", probeTimeout)
	})
	g.expectBlocked("public server to the gateway", bpf.ReasonNoSession, func() error {
		return g.TCP(tu.ClientV4, netip.AddrPortFrom(tu.GatewayPubV4, 8083), probeTimeout)
	})

	// The flow idles out (2 s); a late reply from the server is dropped,
	// and the private host's own ACKs and retransmissions do not revive
	// it: only a SYN creates a TCP flow.
	time.Sleep(3 * time.Second)
	before := g.stats()
	pr, pw := io.Pipe()
	go func() { _, _ = io.Copy(pw, c) }()
	if _, err := io.WriteString(srvSide, "late\n"); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(pr).ReadString('\n')
		got <- line
	}()
	select {
	case line := <-got:
		t.Fatalf("a reply after the flow's idle timeout reached the private host: %q", line)
	case <-time.After(1500 * time.Millisecond):
	}
	if after := g.stats(); after[bpf.ReasonNoSession].Packets == before[bpf.ReasonNoSession].Packets {
		t.Fatal("the late reply was not dropped as no_session")
	}
	c.Close()
}

// pushService is a UDP service that answers every datagram and, once a
// user has spoken, pushes a datagram to them every 5 ms (media, game
// state): what keeps sending after the user's session is revoked.
type pushService struct {
	received atomic.Int64
}

func startPushService(t *testing.T, g *gateway, addr netip.AddrPort) *pushService {
	t.Helper()
	ps := &pushService{}
	var pc *net.UDPConn
	if err := g.Private.Do(func() error {
		var err error
		pc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	var peer atomic.Pointer[netip.AddrPort]
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			ps.received.Add(1)
			peer.Store(&from)
			_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	go func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for range tick.C {
			if p := peer.Load(); p != nil {
				if _, err := pc.WriteToUDPAddrPort([]byte("push"), *p); err != nil && strings.Contains(err.Error(), "closed") {
					return
				}
			}
		}
	}()
	return ps
}

// A revoke cuts a granted session at once while the service keeps
// sending. Granted and revoked through the control plane, as the
// controller does.
//
// This measures the reply path's documented limit (bpf/README.md, "What
// a flow can and cannot admit"): the service's first datagram after the
// session is deleted finds no session entry, so aegis_egress records a
// flow for it, and the user's datagrams from that one source port pass as
// reply while the service keeps sending (each passing datagram refreshes
// the flow). The test pins the limit's extent: only that exact 5-tuple
// passes, another source port of the same user gets nothing through, and
// with --no-reply-tracking the cut is complete. Should the data path close
// the limit, the first assertion fails and this test is to be tightened to
// "nothing passes".
func TestReplyRevokeWhileServiceSends(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	svc := netip.AddrPortFrom(tu.ServiceAV4, 5353)
	ps := startPushService(t, g, svc)
	compat := session.NewSessionManagerClient(cp.dial(p.controller))
	c := rpcCtx(t)
	submit := func(activate bool) {
		t.Helper()
		if ack, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(tu.ClientV4), DstIp: ip4(svc.Addr()), DstPort: uint32(svc.Port()), Activate: activate}); err != nil || !ack.GetSuccess() {
			t.Fatalf("SubmitSession(activate=%v): %v %v", activate, ack, err)
		}
	}

	// run grants, streams from port, revokes, and returns how many of the
	// user's datagrams reached the service in the second after the revoke,
	// from port and from another port of the user.
	run := func(port uint16) (fromPort, fromOther int64) {
		t.Helper()
		submit(true)
		uc, err := dialIn(g.Client, "udp", netip.AddrPortFrom(tu.ClientV4, port), svc.String(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		var pushes atomic.Int64
		go func() {
			buf := make([]byte, 2048)
			for {
				n, err := uc.Read(buf)
				if err != nil {
					return
				}
				if string(buf[:n]) == "push" {
					pushes.Add(1)
				}
			}
		}()
		ctx, stop := context.WithCancel(context.Background())
		defer stop()
		go func() {
			tick := time.NewTicker(5 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
					_, _ = uc.Write([]byte("data"))
				}
			}
		}()
		time.Sleep(300 * time.Millisecond)
		if ps.received.Load() == 0 || pushes.Load() == 0 {
			t.Fatalf("before the revoke: the service received %d, the user %d pushes", ps.received.Load(), pushes.Load())
		}
		submit(false)
		time.Sleep(50 * time.Millisecond) // what was in flight may still land
		base := ps.received.Load()
		time.Sleep(500 * time.Millisecond)
		fromPort = ps.received.Load() - base
		stop()
		time.Sleep(50 * time.Millisecond)
		base = ps.received.Load()
		_ = g.UDP(tu.ClientV4, svc, probeTimeout) // another (ephemeral) port
		fromOther = ps.received.Load() - base
		return fromPort, fromOther
	}

	before := g.stats()
	same, other := run(40000)
	after := g.stats()
	t.Logf("reply tracking on: %d datagrams from the streaming port in the 500 ms after the revoke (%d passed as reply), %d from another port",
		same, after[bpf.ReasonReply].Packets-before[bpf.ReasonReply].Packets, other)
	if same == 0 {
		t.Error("the documented limit is gone (nothing passed after the revoke): tighten this test")
	}
	if other != 0 {
		t.Errorf("%d datagrams from another source port passed after the revoke", other)
	}

	g.loader("load", "--group", strconv.Itoa(daemonGID), "--no-reply-tracking")
	same, other = run(40001)
	if same != 0 || other != 0 {
		t.Errorf("without reply tracking %d (streaming port) and %d (other port) datagrams passed after the revoke, want 0", same, other)
	}
}
