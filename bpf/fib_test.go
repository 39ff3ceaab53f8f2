package bpf_test

import (
	"net/netip"
	"slices"
	"testing"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// The bypasses ask the kernel's routing table whether a destination is
// local (bpf_fib_lookup). Under BPF_PROG_TEST_RUN the table is that of the
// network namespace of the thread making the call, and the lookup's
// ingress interface is the one the XDP context's ingress_ifindex names
// (the namespace's loopback without a context). So the tests run the
// program on a thread inside a namespace of their own, with the frames
// arriving on pub0, and fibLocal describes that namespace's table to the
// model:
//
//	pub0 (veth, peer pub1)  192.0.2.1/24     2001:db8:1::1/64   ingress
//	lan0 (veth, peer lan1)  198.51.100.1/24  2001:db8:2::1/64
//	permanent neighbours on lan0: 198.51.100.2, 2001:db8:2::2
//	203.0.113.0/26   via 198.51.100.2   2001:db8:3::/64 via 2001:db8:2::2
//	203.0.113.64/26  prohibit           2001:db8:5::/64 prohibit
//	203.0.113.128/26 unreachable        2001:db8:6::/64 unreachable
//	203.0.113.192/27 blackhole          2001:db8:7::/64 blackhole
//	no default route: everything else has no route
//
// Forwarding is on, as on a gateway.

var (
	// fibOwn are the addresses the local table holds besides loopback's:
	// the interfaces' own, the IPv4 subnet broadcasts, and the IPv6
	// subnet-router anycast addresses a forwarding interface joins.
	fibOwn = addrs("192.0.2.1", "192.0.2.255", "198.51.100.1", "198.51.100.255",
		"2001:db8:1::1", "2001:db8:2::1", "2001:db8:1::", "2001:db8:2::")
	// fibRoutes are the main table's routes: connected, via a gateway,
	// and the three kinds that drop.
	fibRoutes = prefixes("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/26", "203.0.113.64/26",
		"203.0.113.128/26", "203.0.113.192/27",
		"2001:db8:1::/64", "2001:db8:2::/64", "2001:db8:3::/64", "2001:db8:5::/64",
		"2001:db8:6::/64", "2001:db8:7::/64")
)

// fibLocal answers for the namespace's table what bpf_fib_lookup answers
// with BPF_FIB_LKUP_RET_NOT_FWDED for a unicast destination: a local,
// broadcast or anycast route; for IPv6 a link-local or loopback
// destination (never forwarded, answered before any lookup); or no route.
// Every route in fibRoutes is forwarded or drops.
func fibLocal(a netip.Addr) bool {
	b := a.As16()
	switch {
	case slices.Contains(fibOwn, a):
		return true
	case a.Is4() && a.As4()[0] == 127: // local 127.0.0.0/8 dev lo
		return true
	case a.Is6() && b[0] == 0xFE && b[1]&0xC0 == 0x80: // fe80::/10
		return true
	case a == netip.IPv6Loopback():
		return true
	}
	for _, p := range fibRoutes {
		if p.Contains(a) {
			return false
		}
	}
	return true
}

func newFibNetns(t testing.TB) *tu.Routed {
	t.Helper()
	var own6 []netip.Addr
	for _, a := range fibOwn {
		if a.Is6() {
			own6 = append(own6, a)
		}
	}
	return tu.NewRouted(t, "aegis-fib-", true, [][]string{
		{"addr", "add", "192.0.2.1/24", "dev", "pub0"},
		{"addr", "add", "2001:db8:1::1/64", "dev", "pub0", "nodad"},
		{"addr", "add", "198.51.100.1/24", "dev", "lan0"},
		{"addr", "add", "2001:db8:2::1/64", "dev", "lan0", "nodad"},
		{"neigh", "add", "198.51.100.2", "lladdr", "02:00:00:00:00:02", "dev", "lan0", "nud", "permanent"},
		{"neigh", "add", "2001:db8:2::2", "lladdr", "02:00:00:00:00:02", "dev", "lan0", "nud", "permanent"},
		{"route", "add", "203.0.113.0/26", "via", "198.51.100.2"},
		{"route", "add", "prohibit", "203.0.113.64/26"},
		{"route", "add", "unreachable", "203.0.113.128/26"},
		{"route", "add", "blackhole", "203.0.113.192/27"},
		{"-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:2::2"},
		{"-6", "route", "add", "prohibit", "2001:db8:5::/64"},
		{"-6", "route", "add", "unreachable", "2001:db8:6::/64"},
		{"-6", "route", "add", "blackhole", "2001:db8:7::/64"},
	}, own6)
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}
