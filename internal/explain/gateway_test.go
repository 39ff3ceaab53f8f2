package explain_test

import (
	"net/netip"
	"testing"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// newGateway is a network namespace laid out as a gateway's, for the
// bypasses' locality question (bpf_fib_lookup from the ingress interface,
// which BPF_PROG_TEST_RUN asks in the calling thread's namespace):
//
//	pub0 (veth, peer pub1)  192.0.2.1/24     2001:db8:1::1/64   ingress
//	lan0 (veth, peer lan1)  198.51.100.1/24  2001:db8:2::1/64
//	                        198.51.100.10/32 2001:db8:2::10/128 the gateway's too
//	permanent neighbours on lan0: 198.51.100.2, 2001:db8:2::2
//	203.0.113.0/26   via 198.51.100.2   2001:db8:5::/64 via 2001:db8:2::2
//	203.0.113.64/26  unreachable        2001:db8:6::/64 unreachable
//	203.0.113.192/26 blackhole          2001:db8:7::/64 blackhole
//	no default route: 203.0.113.128/26 and 2001:db8:9::/64 have none
//
// With forwarding off, bpf_fib_lookup answers FWD_DISABLED for every
// destination.
func newGateway(t *testing.T, forwarding bool) *tu.Routed {
	t.Helper()
	return tu.NewRouted(t, "aegis-expl-", forwarding, [][]string{
		{"addr", "add", "192.0.2.1/24", "dev", "pub0"},
		{"addr", "add", "2001:db8:1::1/64", "dev", "pub0", "nodad"},
		{"addr", "add", "198.51.100.1/24", "dev", "lan0"},
		{"addr", "add", "198.51.100.10/32", "dev", "lan0"},
		{"addr", "add", "2001:db8:2::1/64", "dev", "lan0", "nodad"},
		{"addr", "add", "2001:db8:2::10/128", "dev", "lan0", "nodad"},
		{"neigh", "add", "198.51.100.2", "lladdr", "02:00:00:00:00:02", "dev", "lan0", "nud", "permanent"},
		{"neigh", "add", "2001:db8:2::2", "lladdr", "02:00:00:00:00:02", "dev", "lan0", "nud", "permanent"},
		{"route", "add", "203.0.113.0/26", "via", "198.51.100.2"},
		{"route", "add", "unreachable", "203.0.113.64/26"},
		{"route", "add", "blackhole", "203.0.113.192/26"},
		{"-6", "route", "add", "2001:db8:5::/64", "via", "2001:db8:2::2"},
		{"-6", "route", "add", "unreachable", "2001:db8:6::/64"},
		{"-6", "route", "add", "blackhole", "2001:db8:7::/64"},
	}, []netip.Addr{netip.MustParseAddr("2001:db8:2::10"), netip.MustParseAddr("2001:db8:1::1")})
}
