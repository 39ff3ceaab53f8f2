package e2e

import (
	"fmt"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// Path MTU discovery across the gateway: a router on the public side
// between the user and the gateway has a smaller MTU towards the user, so
// the service's full-size segments need its ICMP "fragmentation needed"
// (IPv4) or "packet too big" (IPv6), which must pass the gateway's XDP as
// icmp_related. Without them the download stalls (a PMTU black hole).
//
//	user ns        router (the topology's client ns)     gateway      private
//	u0 ──── MTU 1400 r0  cli0 ─────────────────────────── pub0 [XDP]  srv0
//	203.0.113.10       203.0.113.1  192.0.2.10             192.0.2.1    198.51.100.10
//	2001:db8:3::10     2001:db8:3::1 2001:db8:1::10        2001:db8:1::1 2001:db8:2::10

const pmtuDownload = 10 << 20

func TestPMTUDiscoveryThroughGateway(t *testing.T) {
	g := newGateway(t, "load")
	user := tu.NewNetns(t, "aegis-usr-")
	router := g.Client
	user.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	router.Run(t, "ip", "link", "add", "r0", "mtu", "1400", "type", "veth", "peer", "name", "u0", "netns", user.Name)
	router.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	for _, ns := range []*tu.Netns{user, router, g.Gateway, g.Private} {
		// PMTU discovery on, TCP's own probing off: the ICMP path is what
		// must work.
		ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_no_pmtu_disc=0", "net.ipv4.tcp_mtu_probing=0")
	}
	router.Run(t, "ip", "addr", "add", "203.0.113.1/24", "dev", "r0")
	router.Run(t, "ip", "addr", "add", "2001:db8:3::1/64", "dev", "r0", "nodad")
	router.Run(t, "ip", "link", "set", "r0", "up")
	user.Run(t, "ip", "addr", "add", "203.0.113.10/24", "dev", "u0")
	user.Run(t, "ip", "addr", "add", "2001:db8:3::10/64", "dev", "u0", "nodad")
	user.Run(t, "ip", "link", "set", "u0", "up")
	user.Run(t, "ip", "link", "set", "lo", "up")
	user.Run(t, "ip", "route", "add", "default", "via", "203.0.113.1")
	user.Run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:3::1")
	g.Gateway.Run(t, "ip", "route", "add", "203.0.113.0/24", "via", tu.ClientV4.String())
	g.Gateway.Run(t, "ip", "-6", "route", "add", "2001:db8:3::/64", "via", tu.ClientV6.String())

	for _, fam := range []struct {
		name       string
		user, svc  netip.Addr
		icmpReason string
	}{
		{"ipv4", netip.MustParseAddr("203.0.113.10"), tu.ServiceAV4, "fragmentation needed"},
		{"ipv6", netip.MustParseAddr("2001:db8:3::10"), tu.ServiceAV6, "packet too big"},
	} {
		t.Run(fam.name, func(t *testing.T) {
			g.t = t
			svc := netip.AddrPortFrom(fam.svc, 8090)
			bulkServer(t, g.Private, svc, pmtuDownload)
			g.grant(state.Session{Key: tcpKey(fam.user, fam.svc, 8090), User: "alice", IdleTimeout: time.Minute})
			before := g.stats()
			n, err := download(user, svc, 20*time.Second)
			after := g.stats()
			if err != nil || n != pmtuDownload {
				t.Fatalf("download of %d bytes through a 1400-byte hop: %d bytes, %v (icmp_related %d, unsupported_l4 %d)", pmtuDownload, n, err,
					after[bpf.ReasonICMPRelated].Packets-before[bpf.ReasonICMPRelated].Packets,
					after[bpf.ReasonUnsupportedL4].Packets-before[bpf.ReasonUnsupportedL4].Packets)
			}
			if after[bpf.ReasonICMPRelated].Packets == before[bpf.ReasonICMPRelated].Packets {
				t.Fatalf("download completed without a %s passing as icmp_related: the hop did not constrain it", fam.icmpReason)
			}
		})
	}

	// The control: the same download admitted by an allow rule instead of a
	// session. Replies to allow-rule traffic create no flow, so no ICMP
	// error about them is icmp_related: the router's "fragmentation
	// needed" drops and the download stalls, as it did for every session
	// before the data path had the icmp_related rule. Should allow-rule
	// traffic get an ICMP path, this fails and is to become a pass.
	t.Run("allow rule, no ICMP path", func(t *testing.T) {
		g.t = t
		g.loader("load", "--allow", "203.0.113.0/24,tcp/8091")
		svc := netip.AddrPortFrom(tu.ServiceAV4, 8091)
		bulkServer(t, g.Private, svc, pmtuDownload)
		// A user address the service holds no learned path MTU for.
		user.Run(t, "ip", "addr", "add", "203.0.113.11/24", "dev", "u0")
		before := g.stats()
		n, err := downloadFrom(user, netip.MustParseAddr("203.0.113.11"), svc, 3*time.Second)
		after := g.stats()
		if err == nil || n == pmtuDownload {
			t.Fatalf("download through the 1400-byte hop without an ICMP path completed (%d bytes)", n)
		}
		if after[bpf.ReasonAllowlist].Packets == before[bpf.ReasonAllowlist].Packets {
			t.Fatal("the download did not go through the allow rule")
		}
		t.Logf("stalled after %d of %d bytes: %v", n, pmtuDownload, err)
	})
}

// bulkServer serves size bytes to every TCP connection on addr in ns.
func bulkServer(t *testing.T, ns *tu.Netns, addr netip.AddrPort, size int) {
	t.Helper()
	ln := listenIn(t, ns, addr)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for left := size; left > 0; {
					n, err := c.Write(buf[:min(left, len(buf))])
					if err != nil {
						return
					}
					left -= n
				}
			}()
		}
	}()
}

// download reads from a bulkServer at addr from ns until it closes.
func download(ns *tu.Netns, addr netip.AddrPort, timeout time.Duration) (int64, error) {
	return downloadFrom(ns, netip.Addr{}, addr, timeout)
}

func downloadFrom(ns *tu.Netns, src netip.Addr, addr netip.AddrPort, timeout time.Duration) (int64, error) {
	var local netip.AddrPort
	if src.IsValid() {
		local = netip.AddrPortFrom(src, 0)
	}
	c, err := dialIn(ns, "tcp", local, addr.String(), 2*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		return n, fmt.Errorf("after %d bytes: %w", n, err)
	}
	return n, nil
}
