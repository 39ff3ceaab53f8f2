package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// A 4,000-byte UDP datagram crosses the 1500-byte public link in three
// fragments; only the first carries the ports. Over a granted session the
// later ones pass under the first one's reason and the echo arrives whole;
// for a tuple without a session they stay dropped, counted as fragment.
func TestFragmentsOfGrantedDatagram(t *testing.T) {
	g := newGateway(t, "load")
	for _, fam := range []struct {
		name         string
		client, svcA netip.Addr
		svcB         netip.Addr
	}{
		{"ipv4", tu.ClientV4, tu.ServiceAV4, tu.ServiceBV4},
		{"ipv6", tu.ClientV6, tu.ServiceAV6, tu.ServiceBV6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			g.t = t
			granted := netip.AddrPortFrom(fam.svcA, 7000)
			other := netip.AddrPortFrom(fam.svcB, 7000)
			g.Serve(t, granted)
			g.Serve(t, other)
			g.grant(state.Session{Key: udpKey(fam.client, fam.svcA, 7000), User: "alice", IdleTimeout: time.Minute})
			before := g.stats()
			if err := g.UDPSize(fam.client, granted, 4000, time.Second); err != nil {
				t.Fatalf("4000-byte datagram over a granted session: %v", err)
			}
			after := g.stats()
			// Three fragments passed: the first as session, the others
			// under its reason.
			if d := after[bpf.ReasonSession].Packets - before[bpf.ReasonSession].Packets; d < 3 {
				t.Fatalf("%d packets passed as session, want the 3 fragments", d)
			}
			g.expectBlocked("4000-byte datagram without a session", bpf.ReasonFragment, func() error {
				return g.UDPSize(fam.client, other, 4000, probeTimeout)
			})
		})
	}
}
