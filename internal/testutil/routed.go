package testutil

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// Routed is a network namespace laid out as a gateway by the caller's ip
// commands, over two veths: pub0 (peer pub1), where frames arrive, and
// lan0 (peer lan1). Programs run with Run see it as BPF_PROG_TEST_RUN
// does from its thread: bpf_fib_lookup answers from its routes.
type Routed struct {
	NS      *Netns
	Thread  *Thread
	Ifindex uint32 // pub0's
}

// NewRouted creates the namespace with forwarding on or off, runs each of
// ipCmds as the arguments of one ip command, and waits for the local
// routes of local6, which IPv6 installs from a work queue after an
// address is added.
func NewRouted(t testing.TB, prefix string, forwarding bool, ipCmds [][]string, local6 []netip.Addr) *Routed {
	t.Helper()
	ns := NewNetns(t, prefix)
	fw := "0"
	if forwarding {
		fw = "1"
	}
	ns.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward="+fw, "net.ipv6.conf.all.forwarding="+fw,
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	ns.AddVeth(t, "pub0", "pub1")
	ns.AddVeth(t, "lan0", "lan1")
	for _, c := range ipCmds {
		ns.Run(t, "ip", c...)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		out := ns.Run(t, "ip", "-6", "route", "show", "table", "local")
		missing := ""
		for _, a := range local6 {
			if !strings.Contains(out, " "+a.String()+" dev ") {
				missing = a.String()
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no local route for %s:\n%s", missing, out)
		}
	}
	r := &Routed{NS: ns, Thread: ns.Thread(t)}
	var err error
	r.Thread.Do(func() {
		var ifc *net.Interface
		if ifc, err = net.InterfaceByName("pub0"); err == nil {
			r.Ifindex = uint32(ifc.Index)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Run runs prog on pkt as if it arrived on pub0.
func (r *Routed) Run(prog *ebpf.Program, pkt []byte) (ret uint32, err error) {
	opts := &ebpf.RunOptions{Data: pkt, Context: bpf.XDPArrival(pkt, r.Ifindex)}
	r.Thread.Do(func() { ret, err = prog.Run(opts) })
	return ret, err
}
