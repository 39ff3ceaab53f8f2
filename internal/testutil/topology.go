package testutil

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Topology is the gateway setup the end-to-end tests run on:
//
//	client ns            gateway ns (forwarding)            private ns
//	cli0 ───────────── pub0 [XDP]        priv0 ──────────── srv0
//	192.0.2.10, .11      192.0.2.1         198.51.100.1       198.51.100.5  controller
//	2001:db8:1::10, ::11 2001:db8:1::1     2001:db8:2::1      198.51.100.10 service A
//	                                                          198.51.100.20 service B
//	                                                          2001:db8:2::5, ::10, ::20
//
// Neighbours are resolved by ARP and NDP through the XDP program; there are
// no static entries.
type Topology struct {
	Client, Gateway, Private *Netns
}

// Addresses of the topology.
var (
	ClientV4      = netip.MustParseAddr("192.0.2.10")
	OtherClientV4 = netip.MustParseAddr("192.0.2.11")
	GatewayPubV4  = netip.MustParseAddr("192.0.2.1")
	GatewayPrivV4 = netip.MustParseAddr("198.51.100.1")
	ControllerV4  = netip.MustParseAddr("198.51.100.5")
	ServiceAV4    = netip.MustParseAddr("198.51.100.10")
	ServiceBV4    = netip.MustParseAddr("198.51.100.20")

	ClientV6      = netip.MustParseAddr("2001:db8:1::10")
	OtherClientV6 = netip.MustParseAddr("2001:db8:1::11")
	GatewayPubV6  = netip.MustParseAddr("2001:db8:1::1")
	GatewayPrivV6 = netip.MustParseAddr("2001:db8:2::1")
	ControllerV6  = netip.MustParseAddr("2001:db8:2::5")
	ServiceAV6    = netip.MustParseAddr("2001:db8:2::10")
	ServiceBV6    = netip.MustParseAddr("2001:db8:2::20")
)

// PublicIface is the gateway's public interface, where XDP runs.
const PublicIface = "pub0"

// NewTopology builds the three namespaces; they are removed when t ends.
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	topo := &Topology{
		Client:  NewNetns(t, "aegis-cli-"),
		Gateway: NewNetns(t, "aegis-gw-"),
		Private: NewNetns(t, "aegis-prv-"),
	}
	c, g, p := topo.Client, topo.Gateway, topo.Private
	for _, ns := range []*Netns{c, g, p} {
		// No duplicate address detection: addresses, link-local ones
		// included, are usable at once instead of after a second.
		ns.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	}
	g.Run(t, "ip", "link", "add", "pub0", "type", "veth", "peer", "name", "cli0", "netns", c.Name)
	g.Run(t, "ip", "link", "add", "priv0", "type", "veth", "peer", "name", "srv0", "netns", p.Name)
	g.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

	addrs := []struct {
		ns    *Netns
		dev   string
		addrs []string
	}{
		{c, "cli0", []string{"192.0.2.10/24", "192.0.2.11/24", "2001:db8:1::10/64", "2001:db8:1::11/64"}},
		{g, "pub0", []string{"192.0.2.1/24", "2001:db8:1::1/64"}},
		{g, "priv0", []string{"198.51.100.1/24", "2001:db8:2::1/64"}},
		{p, "srv0", []string{"198.51.100.5/24", "198.51.100.10/24", "198.51.100.20/24",
			"2001:db8:2::5/64", "2001:db8:2::10/64", "2001:db8:2::20/64"}},
	}
	for _, a := range addrs {
		for _, addr := range a.addrs {
			args := []string{"addr", "add", addr, "dev", a.dev}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad")
			}
			a.ns.Run(t, "ip", args...)
		}
		a.ns.Run(t, "ip", "link", "set", a.dev, "up")
	}
	c.Run(t, "ip", "route", "add", "default", "via", "192.0.2.1")
	c.Run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
	p.Run(t, "ip", "route", "add", "default", "via", "198.51.100.1")
	p.Run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:2::1")
	// IPv6 joins each address's solicited-node multicast group from a
	// work queue after link-up; until then neighbour solicitations for the
	// address go unanswered. Wait for every group.
	for _, a := range addrs {
		var want []string
		for _, addr := range a.addrs {
			if pfx := netip.MustParsePrefix(addr); pfx.Addr().Is6() {
				b := pfx.Addr().As16()
				want = append(want, fmt.Sprintf("ff02::1:ff%02x:%02x%02x", b[13], b[14], b[15]))
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			// The link-local address comes from the same work; its
			// presence means the interface's IPv6 setup has run.
			ll := a.ns.Run(t, "ip", "-6", "addr", "show", "dev", a.dev, "scope", "link")
			if !strings.Contains(ll, "inet6 fe80:") || strings.Contains(ll, "tentative") {
				if time.Now().After(deadline) {
					t.Fatalf("%s in %s has no usable link-local address:\n%s", a.dev, a.ns.Name, ll)
				}
				time.Sleep(10 * time.Millisecond)
				continue
			}
			out := a.ns.Run(t, "ip", "-6", "maddr", "show", "dev", a.dev)
			missing := ""
			for _, grp := range want {
				if !containsGroup(out, grp) {
					missing = grp
				}
			}
			if missing == "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s in %s never joined %s:\n%s", a.dev, a.ns.Name, missing, out)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return topo
}

// containsGroup reports whether "ip -6 maddr" output lists the group,
// which it prints in canonical (compressed) form.
func containsGroup(out, group string) bool {
	return strings.Contains(out, netip.MustParseAddr(group).String())
}

// Neighbours returns "ip neigh" output of a namespace.
func (n *Netns) Neighbours(t testing.TB) string {
	return n.Run(t, "ip", "neigh", "show")
}

// Server is a TCP and UDP echo server in the private namespace.
type Server struct {
	Addr     netip.AddrPort
	accepted atomic.Int64
	packets  atomic.Int64
	seen     sync.Map // UDP stream sequence numbers
	closers  []io.Closer
}

// Accepted is the number of TCP connections the server accepted.
func (s *Server) Accepted() int64 { return s.accepted.Load() }

// Packets is the number of UDP datagrams the server received.
func (s *Server) Packets() int64 { return s.packets.Load() }

// Serve starts a TCP and a UDP echo server on addr in the private
// namespace; they stop when t ends.
func (topo *Topology) Serve(t testing.TB, addr netip.AddrPort) *Server {
	t.Helper()
	s := &Server{Addr: addr}
	err := topo.Private.Do(func() error {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		if err != nil {
			return err
		}
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		if err != nil {
			ln.Close()
			return err
		}
		_ = pc.SetReadBuffer(4 << 20)
		s.closers = append(s.closers, ln, pc)
		go s.serveTCP(ln)
		go s.serveUDP(pc)
		return nil
	})
	if err != nil {
		t.Fatalf("serve %s: %v", addr, err)
	}
	t.Cleanup(func() {
		for _, c := range s.closers {
			c.Close()
		}
	})
	return s
}

func (s *Server) serveTCP(ln *net.TCPListener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.accepted.Add(1)
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

func (s *Server) serveUDP(pc *net.UDPConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		s.packets.Add(1)
		if n >= 12 && string(buf[:4]) == "SEQ:" {
			s.seen.Store(binary.BigEndian.Uint64(buf[4:12]), true)
			continue // stream datagrams are counted, not echoed
		}
		_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
	}
}

// Seen reports whether the stream datagram with sequence number seq
// arrived.
func (s *Server) Seen(seq uint64) bool {
	_, ok := s.seen.Load(seq)
	return ok
}

// Received counts the distinct stream sequence numbers in [0, n).
func (s *Server) Received(n uint64) uint64 {
	var got uint64
	s.seen.Range(func(k, _ any) bool {
		if k.(uint64) < n {
			got++
		}
		return true
	})
	return got
}

// TCP opens a TCP connection from src (a client address) to dst through the
// gateway and checks that data comes back. It returns an error when the
// handshake or the echo does not complete within timeout.
func (topo *Topology) TCP(src netip.Addr, dst netip.AddrPort, timeout time.Duration) error {
	return topo.Client.Do(func() error {
		d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
		c, err := d.Dial("tcp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		if line != "ping\n" {
			return fmt.Errorf("echo %q", line)
		}
		return nil
	})
}

// UDP sends one datagram from src to dst and waits for the echo.
func (topo *Topology) UDP(src netip.Addr, dst netip.AddrPort, timeout time.Duration) error {
	return topo.UDPSize(src, dst, 4, timeout)
}

// UDPSize sends one datagram of size bytes from src to dst and waits for
// the same bytes to come back.
func (topo *Topology) UDPSize(src netip.Addr, dst netip.AddrPort, size int, timeout time.Duration) error {
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	return topo.Client.Do(func() error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.Write(msg); err != nil {
			return err
		}
		buf := make([]byte, size+1)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if string(buf[:n]) != string(msg) {
			return fmt.Errorf("echo of %d bytes differs (%d bytes back)", size, n)
		}
		return nil
	})
}

// Stream sends numbered UDP datagrams from src to a Server at a steady rate
// until ctx ends, and returns how many it sent. Compare with
// Server.Received to count losses.
func (topo *Topology) Stream(ctx context.Context, src netip.Addr, dst netip.AddrPort, perSecond int) (uint64, error) {
	var sent uint64
	err := topo.Client.Do(func() error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		// Timers fire at best every few hundred microseconds: send a
		// small burst per millisecond tick, paced against the clock.
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		start := time.Now()
		buf := make([]byte, 64)
		copy(buf, "SEQ:")
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
			due := uint64(time.Since(start).Seconds() * float64(perSecond))
			for ; sent < due; sent++ {
				binary.BigEndian.PutUint64(buf[4:], sent)
				if _, err := c.Write(buf); err != nil {
					return err
				}
			}
		}
	})
	return sent, err
}

// WaitReceived waits until s has received every datagram of a stream of n,
// or until timeout, and returns how many it has.
func (s *Server) WaitReceived(n uint64, timeout time.Duration) uint64 {
	deadline := time.Now().Add(timeout)
	for {
		got := s.Received(n)
		if got == n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}
