package bpf_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// The egress program attaches as the loader will attach it: tcx on the
// public interface's egress, through a bpf_link that is pinned and
// outlives its file descriptor. Datagrams and a TCP connection attempt
// the kernel really sends then leave their reply tuples in flows_v4.
func TestEgressAttachesWithTCX(t *testing.T) {
	h := newHarness(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	if at := spec.Programs["aegis_egress"].AttachType; at != ebpf.AttachTCXEgress {
		t.Fatalf("aegis_egress attach type %v, want %v", at, ebpf.AttachTCXEgress)
	}
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Minute})

	ns := tu.NewNetns(t, "aegis-tcx-")
	ns.AddVeth(t, "pub0", "pub1")
	ns.Run(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "pub0")
	ns.Run(t, "ip", "neigh", "add", "192.0.2.99", "lladdr", "02:00:00:00:00:99", "dev", "pub0", "nud", "permanent")

	dir := tu.PinDir(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(dir, "egress")
	var l link.Link
	if err := ns.Do(func() error {
		ifc, err := net.InterfaceByName("pub0")
		if err != nil {
			return err
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: h.egress, Attach: ebpf.AttachTCXEgress})
		return err
	}); errors.Is(err, ebpf.ErrNotSupported) {
		tu.RequireKernel(t) // fails under AEGIS_REQUIRE_KERNEL_TESTS=1
		t.Skipf("tcx: %v", err)
	} else if err != nil {
		t.Fatalf("attach tcx: %v", err)
	}
	if err := l.Pin(pin); err != nil {
		t.Fatal(err)
	}
	l.Close() // the pin keeps it attached
	t.Cleanup(func() {
		if pl, err := link.LoadPinnedLink(pin, nil); err == nil {
			pl.Unpin()
			pl.Close()
		}
	})

	var udpPort, tcpPort uint16
	if err := ns.Do(func() error {
		c, err := net.Dial("udp4", "192.0.2.99:53")
		if err != nil {
			return err
		}
		defer c.Close()
		udpPort = uint16(c.LocalAddr().(*net.UDPAddr).Port)
		if _, err := c.Write([]byte("query")); err != nil {
			return err
		}
		d := net.Dialer{Timeout: 300 * time.Millisecond}
		tc, err := d.Dial("tcp4", "192.0.2.99:443") // the SYN leaves; nobody answers
		if err == nil {
			tc.Close()
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The TCP attempt's source port is not known to the caller after a
	// failed dial: find the flow by everything else.
	var k bpf.AegisFlowKeyV4
	var v bpf.AegisFlowValue
	found := map[uint8]bool{}
	for it := h.objs.FlowsV4.Iterate(); it.Next(&k, &v); {
		if netip.AddrFrom4(k.Src) != netip.MustParseAddr("192.0.2.99") || netip.AddrFrom4(k.Dst) != netip.MustParseAddr("192.0.2.1") {
			t.Fatalf("unexpected flow %+v", k)
		}
		switch {
		case k.Proto == tu.ProtoUDP && k.Sport == 53 && k.Dport == udpPort:
			found[tu.ProtoUDP] = true
		case k.Proto == tu.ProtoTCP && k.Sport == 443:
			found[tu.ProtoTCP], tcpPort = true, k.Dport
		default:
			t.Fatalf("unexpected flow %+v", k)
		}
	}
	if !found[tu.ProtoUDP] || !found[tu.ProtoTCP] {
		t.Fatalf("flows recorded: %v, want the UDP and the TCP one", found)
	}
	t.Logf("flows: udp 192.0.2.99:53 -> :%d, tcp 192.0.2.99:443 -> :%d", udpPort, tcpPort)
}
