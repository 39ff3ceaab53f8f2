package explain_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// gateway is a network namespace laid out as a gateway's, for the
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
type gateway struct {
	ns      *tu.Netns
	thread  *tu.Thread
	ifindex uint32
}

func newGateway(t *testing.T, forwarding bool) *gateway {
	t.Helper()
	ns := tu.NewNetns(t, "aegis-expl-")
	fw := "0"
	if forwarding {
		fw = "1"
	}
	ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward="+fw, "net.ipv6.conf.all.forwarding="+fw,
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	ns.AddVeth(t, "pub0", "pub1")
	ns.AddVeth(t, "lan0", "lan1")
	for _, c := range [][]string{
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
	} {
		ns.Run(t, "ip", c...)
	}
	// IPv6 installs an address's local route from a work queue.
	deadline := time.Now().Add(5 * time.Second)
	for {
		out := ns.Run(t, "ip", "-6", "route", "show", "table", "local")
		if strings.Contains(out, " 2001:db8:2::10 dev ") && strings.Contains(out, " 2001:db8:1::1 dev ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no local IPv6 routes:\n%s", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	g := &gateway{ns: ns, thread: ns.Thread(t)}
	var err error
	g.thread.Do(func() {
		var ifc *net.Interface
		if ifc, err = net.InterfaceByName("pub0"); err == nil {
			g.ifindex = uint32(ifc.Index)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// xdpMD is struct xdp_md as BPF_PROG_TEST_RUN takes it.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// run runs prog on pkt as if it arrived on pub0.
func (g *gateway) run(prog *ebpf.Program, pkt []byte) (ret uint32, err error) {
	opts := &ebpf.RunOptions{Data: pkt, Context: xdpMD{DataEnd: uint32(len(pkt)), IngressIfindex: g.ifindex}}
	g.thread.Do(func() { ret, err = prog.Run(opts) })
	return ret, err
}
