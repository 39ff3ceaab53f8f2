package bpf_test

import (
	"encoding/hex"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// step is one frame of a stateful case: sent out through the egress
// program, or received by the XDP program and expected to get a reason.
// do, when set, runs instead (a revoke, a check of the flow table).
type step struct {
	out    *pkt
	in     *pkt
	reason bpf.Reason
	do     func(t *testing.T, h *harness)
}

func out(p pkt) step                       { return step{out: &p} }
func in(p pkt, r bpf.Reason) step          { return step{in: &p, reason: r} }
func do(f func(*testing.T, *harness)) step { return step{do: f} }

// The addresses of a family's stateful cases: a user with sessions, a
// protected service (the gateway's side), a peer the service talks to,
// another peer, a router that sends ICMP errors, a management host with
// an ICMP allow rule.
type statefulAddrs struct {
	user, svc, peer, other, router, mgmt netip.Addr
}

func icmpProto(a netip.Addr) uint8 {
	if a.Is4() {
		return tu.ProtoICMP
	}
	return tu.ProtoICMPv6
}

// icmpType picks the v4 or v6 number of an ICMP message.
func icmpType(a netip.Addr, v4, v6 uint8) uint8 {
	if a.Is4() {
		return v4
	}
	return v6
}

func seg(src, dst netip.Addr, sport, dport uint16, flags uint8) pkt {
	return pkt{Frame: tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoTCP, SrcPort: sport, DstPort: dport}, TCPFlags: flags}
}

func dgram(src, dst netip.Addr, sport, dport uint16) pkt {
	return pkt{Frame: tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoUDP, SrcPort: sport, DstPort: dport, Payload: 8}}
}

func echo(src, dst netip.Addr, request bool, id uint16) pkt {
	typ := icmpType(src, 0, 129)
	if request {
		typ = icmpType(src, 8, 128)
	}
	return pkt{Frame: tu.Frame{Src: src, Dst: dst, Proto: icmpProto(src), ICMPType: typ, Payload: 8}, EchoID: id}
}

// icmpErr is an ICMP error of the given type from router to dst quoting
// n bytes after the IP header of quoted.
func icmpErr(router, dst netip.Addr, typ, code uint8, quoted pkt, n int) pkt {
	return pkt{Frame: tu.Frame{Src: router, Dst: dst, Proto: icmpProto(router), ICMPType: typ, ICMPCode: code},
		Quote: quoteOf(quoted, n)}
}

func frag(p pkt, id uint32, offset uint16, more bool) pkt {
	p.IPID, p.FragOffset, p.MoreFragments = id, offset, more
	if p.Src.Is6() {
		p.IPv6Ext = []uint8{44}
	}
	return p
}

const (
	tcpSYN    = 0x02
	tcpSYNACK = 0x12
	tcpACK    = 0x10
)

func statefulCases(a statefulAddrs) []struct {
	name  string
	steps []step
} {
	u, s, p := a.user, a.svc, a.peer
	unreach := icmpType(u, 3, 1)
	return []struct {
		name  string
		steps []step
	}{
		{"any-protocol session passes tcp", []step{in(seg(u, s, 40000, 7000, tcpSYN), bpf.ReasonSession)}},
		{"any-protocol session passes udp", []step{in(dgram(u, s, 40000, 7000), bpf.ReasonSession)}},
		{"any-protocol session does not pass icmp", []step{in(echo(u, s, true, 1), bpf.ReasonNoSession)}},
		{"any-protocol session behind an expired exact one", []step{in(seg(u, s, 40000, 7001, tcpACK), bpf.ReasonSession)}},
		{"exact session expired, no any-protocol one", []step{in(seg(u, s, 40000, 9001, tcpACK), bpf.ReasonExpired)}},

		{"reply to an outbound tcp connection", []step{
			out(seg(s, p, 45000, 443, tcpSYN)),
			in(seg(p, s, 443, 45000, tcpSYNACK), bpf.ReasonReply),
			out(seg(s, p, 45000, 443, tcpACK)),
			in(seg(p, s, 443, 45000, tcpACK), bpf.ReasonReply),
		}},
		{"reply from another port of the peer", []step{
			out(seg(s, p, 45010, 443, tcpSYN)),
			in(seg(p, s, 444, 45010, tcpSYNACK), bpf.ReasonNoSession),
		}},
		{"reply from another peer", []step{
			out(seg(s, p, 45011, 443, tcpSYN)),
			in(seg(a.other, s, 443, 45011, tcpSYNACK), bpf.ReasonNoSession),
		}},
		{"no flow from a syn-ack", []step{
			out(seg(s, p, 45001, 443, tcpSYNACK)),
			in(seg(p, s, 443, 45001, tcpACK), bpf.ReasonNoSession),
		}},
		{"no flow from an ack", []step{
			out(seg(s, p, 45002, 443, tcpACK)),
			in(seg(p, s, 443, 45002, tcpACK), bpf.ReasonNoSession),
		}},
		{"reply to an outbound udp datagram", []step{
			out(dgram(s, p, 45003, 53)),
			in(dgram(p, s, 53, 45003), bpf.ReasonReply),
		}},
		{"a session's replies open no flow", []step{
			do(func(t *testing.T, h *harness) { grantAt(t, h, u, s, 5400, tu.ProtoUDP, state.Now()) }),
			out(dgram(s, u, 5400, 40000)),
			do(func(t *testing.T, h *harness) { revoke(t, h, u, s, 5400, state.UDP) }),
			in(dgram(u, s, 40000, 5400), bpf.ReasonNoSession),
		}},
		{"a revoked session's service that keeps sending opens no flow", []step{
			do(func(t *testing.T, h *harness) { grantAt(t, h, u, s, 5401, tu.ProtoUDP, state.Now()) }),
			out(dgram(s, u, 5401, 40000)),
			do(func(t *testing.T, h *harness) { revoke(t, h, u, s, 5401, state.UDP) }),
			out(dgram(s, u, 5401, 40000)),
			out(dgram(s, u, 5401, 40000)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 5401, tu.ProtoUDP) }),
			in(dgram(u, s, 40000, 5401), bpf.ReasonNoSession),
			// Granted again: passes at once, and still opens no flow.
			do(func(t *testing.T, h *harness) { grantAt(t, h, u, s, 5401, tu.ProtoUDP, state.Now()) }),
			in(dgram(u, s, 40000, 5401), bpf.ReasonSession),
			out(dgram(s, u, 5401, 40000)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 5401, tu.ProtoUDP) }),
		}},
		{"a revoked any-protocol session's service opens no flow", []step{
			do(func(t *testing.T, h *harness) { grantAt(t, h, u, s, 7003, 0, state.Now()) }),
			do(func(t *testing.T, h *harness) { revoke(t, h, u, s, 7003, state.Any) }),
			out(dgram(s, u, 7003, 40000)),
			out(seg(s, u, 7003, 40001, tcpSYN)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 7003, tu.ProtoUDP) }),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40001, 7003, tu.ProtoTCP) }),
			in(dgram(u, s, 40000, 7003), bpf.ReasonNoSession),
			in(seg(u, s, 40001, 7003, tcpSYNACK), bpf.ReasonNoSession),
		}},
		{"a revoked tcp session's service opens no flow", []step{
			do(func(t *testing.T, h *harness) { grantAt(t, h, u, s, 8081, tu.ProtoTCP, state.Now()) }),
			do(func(t *testing.T, h *harness) { revoke(t, h, u, s, 8081, state.TCP) }),
			// Its answers never could; an active open from its port
			// could, but for the tombstone.
			out(seg(s, u, 8081, 40000, tcpACK)),
			out(seg(s, u, 8081, 40000, 0x11)), // FIN, ACK
			out(seg(s, u, 8081, 40000, 0x04)), // RST
			out(seg(s, u, 8081, 40000, tcpSYN)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 8081, tu.ProtoTCP) }),
			in(seg(u, s, 40000, 8081, tcpACK), bpf.ReasonNoSession),
		}},
		{"a tombstone idle past the udp flow timeout counts as absent", []step{
			do(func(t *testing.T, h *harness) { bury(t, h, u, s, 5402, tu.ProtoUDP, state.Now()-2*hour) }),
			out(dgram(s, u, 5402, 40000)),
			in(dgram(u, s, 40000, 5402), bpf.ReasonReply),
		}},
		{"an any-protocol session's replies open no flow", []step{
			out(dgram(s, u, 7002, 40000)),
			out(seg(s, u, 7002, 40000, tcpSYN)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 7002, tu.ProtoUDP) }),
			do(func(t *testing.T, h *harness) { noFlow(t, h, u, s, 40000, 7002, tu.ProtoTCP) }),
		}},
		{"an allow rule's replies open no flow", []step{
			out(dgram(s, a.mgmt, 161, 40000)),
			do(func(t *testing.T, h *harness) { noFlow(t, h, a.mgmt, s, 40000, 161, tu.ProtoUDP) }),
		}},
		{"echo reply to the gateway's ping", []step{
			out(echo(s, p, true, 77)),
			in(echo(p, s, false, 77), bpf.ReasonReply),
			in(echo(p, s, false, 78), bpf.ReasonNoSession),
			in(echo(p, s, true, 77), bpf.ReasonNoSession),
		}},
		{"echo request from an icmp allow rule", []step{in(echo(a.mgmt, s, true, 5), bpf.ReasonAllowlist)}},
		{"echo request from anyone else", []step{in(echo(p, s, true, 5), bpf.ReasonNoSession)}},

		{"icmp error quoting a session's packet", []step{
			in(icmpErr(a.router, s, unreach, 3, seg(s, u, 8080, 40000, tcpACK), 8), bpf.ReasonICMPRelated),
		}},
		{"icmp error quoting an any-protocol session's packet", []step{
			in(icmpErr(a.router, s, unreach, 3, dgram(s, u, 7000, 40000), 8), bpf.ReasonICMPRelated),
		}},
		{"icmp error quoting an expired session's packet", []step{
			in(icmpErr(a.router, s, unreach, 3, seg(s, u, 9001, 40000, tcpACK), 8), bpf.ReasonNoSession),
		}},
		{"icmp error quoting a packet to the session's user", []step{
			// The user's packet to the service, not the service's reply.
			in(icmpErr(a.router, u, unreach, 3, seg(u, s, 40000, 8080, tcpACK), 8), bpf.ReasonNoSession),
		}},
		{"icmp error quoting a flow's packet", []step{
			out(seg(s, p, 45004, 443, tcpSYN)),
			in(icmpErr(a.router, s, unreach, 4, seg(s, p, 45004, 443, tcpSYN), 8), bpf.ReasonICMPRelated),
			in(icmpErr(a.router, s, icmpType(u, 11, 3), 0, seg(s, p, 45004, 443, tcpSYN), 20), bpf.ReasonICMPRelated),
			in(icmpErr(a.router, s, icmpType(u, 12, 4), 0, seg(s, p, 45004, 443, tcpSYN), 8), bpf.ReasonICMPRelated),
		}},
		{"packet too big or fragmentation needed for a flow", []step{
			out(dgram(s, p, 45005, 4789)),
			in(icmpErr(a.router, s, icmpType(u, 3, 2), icmpType(u, 4, 0), dgram(s, p, 45005, 4789), 8), bpf.ReasonICMPRelated),
		}},
		{"icmp error quoting the gateway's ping", []step{
			out(echo(s, p, true, 91)),
			in(icmpErr(a.router, s, icmpType(u, 11, 3), 0, echo(s, p, true, 91), 8), bpf.ReasonICMPRelated),
			in(icmpErr(a.router, s, icmpType(u, 11, 3), 0, echo(s, p, true, 92), 8), bpf.ReasonNoSession),
		}},
		{"icmp error quoting an unknown packet", []step{
			in(icmpErr(a.router, s, unreach, 3, dgram(s, p, 45999, 53), 8), bpf.ReasonNoSession),
		}},
		{"icmp error to someone else than the quoted sender", []step{
			in(icmpErr(a.router, a.other, unreach, 3, seg(s, u, 8080, 40000, tcpACK), 8), bpf.ReasonNoSession),
		}},
		{"icmp error with a truncated quote", []step{
			in(icmpErr(a.router, s, unreach, 3, seg(s, u, 8080, 40000, tcpACK), 4), bpf.ReasonMalformed),
		}},
		{"icmp error quoting half an ip header", []step{
			in(icmpErr(a.router, s, unreach, 3, seg(s, u, 8080, 40000, tcpACK), -12), bpf.ReasonMalformed),
		}},
		{"icmp error quoting another ip version", []step{
			in(func() pkt {
				e := icmpErr(a.router, s, unreach, 3, seg(s, u, 8080, 40000, tcpACK), 8)
				e.Quote[0] ^= 0x20
				return e
			}(), bpf.ReasonMalformed),
		}},
		{"icmp error quoting a later fragment", []step{
			in(icmpErr(a.router, s, unreach, 3, frag(seg(s, u, 8080, 40000, tcpACK), 5, 10, false), 8), bpf.ReasonNoSession),
		}},
		{"icmp error from an icmp allow rule", []step{
			in(icmpErr(a.mgmt, s, unreach, 3, dgram(s, p, 45999, 53), 8), bpf.ReasonAllowlist),
		}},
		{"icmp redirect quoting a session's packet", []step{
			// IPv4 redirect; on IPv6 it is neighbour discovery, and not
			// bypassed without hop limit 255.
			in(icmpErr(a.router, s, icmpType(u, 5, 137), 0, seg(s, u, 8080, 40000, tcpACK), 8), bpf.ReasonUnsupportedL4),
		}},

		{"later fragments of a session's datagram", []step{
			in(frag(dgram(u, s, 40000, 5353), 0x100, 0, true), bpf.ReasonSession),
			in(frag(dgram(u, s, 40000, 5353), 0x100, 185, true), bpf.ReasonSession),
			in(frag(dgram(u, s, 40000, 5353), 0x100, 370, false), bpf.ReasonSession),
			in(frag(dgram(u, s, 40000, 5353), 0x101, 185, false), bpf.ReasonFragment),
			in(frag(dgram(a.other, s, 40000, 5353), 0x100, 185, false), bpf.ReasonFragment),
		}},
		{"a later fragment before its first", []step{
			in(frag(dgram(u, s, 40000, 5353), 0x102, 185, false), bpf.ReasonFragment),
			in(frag(dgram(u, s, 40000, 5353), 0x102, 0, true), bpf.ReasonSession),
			in(frag(dgram(u, s, 40000, 5353), 0x102, 185, false), bpf.ReasonSession),
		}},
		{"later fragments of a reply", []step{
			out(dgram(s, p, 45006, 53)),
			in(frag(dgram(p, s, 53, 45006), 0x103, 0, true), bpf.ReasonReply),
			in(frag(dgram(p, s, 53, 45006), 0x103, 185, false), bpf.ReasonReply),
		}},
		{"later fragments of an allowed datagram", []step{
			in(frag(dgram(a.mgmt, s, 40000, 9999), 0x104, 0, true), bpf.ReasonAllowlist),
			in(frag(dgram(a.mgmt, s, 40000, 9999), 0x104, 185, false), bpf.ReasonAllowlist),
		}},
		{"later fragments of a dropped datagram", []step{
			in(frag(dgram(p, s, 40000, 5353), 0x105, 0, true), bpf.ReasonNoSession),
			in(frag(dgram(p, s, 40000, 5353), 0x105, 185, false), bpf.ReasonFragment),
		}},
	}
}

// grantAt writes a session of an hour's idle timeout last seen at
// lastSeen; proto 0 is an any-protocol session.
func grantAt(t *testing.T, h *harness, user, svc netip.Addr, port uint16, proto uint8, lastSeen uint64) {
	t.Helper()
	v := bpf.AegisSessionValue{LastSeenNs: lastSeen, CreatedNs: lastSeen, IdleTimeoutNs: uint64(time.Hour)}
	if user.Is4() {
		h.putSession(t, bpf.AegisSessionKeyV4{Src: user.As4(), Dst: svc.As4(), Dport: port, Proto: proto}, v)
	} else {
		h.putSession(t, bpf.AegisSessionKeyV6{Src: user.As16(), Dst: svc.As16(), Dport: port, Proto: proto}, v)
	}
}

func revoke(t *testing.T, h *harness, src, dst netip.Addr, port uint16, p state.Protocol) {
	t.Helper()
	if err := h.maps.Revoke(state.Key{Src: src, Dst: dst, Port: port, Proto: p}); err != nil {
		t.Fatal(err)
	}
}

// bury writes a tombstone last seen at lastSeen; proto 0 is an
// any-protocol one.
func bury(t *testing.T, h *harness, user, svc netip.Addr, port uint16, proto uint8, lastSeen uint64) {
	t.Helper()
	v := bpf.AegisTombValue{LastSeenNs: lastSeen, RemovedNs: lastSeen, Cause: uint32(bpf.AegisTombCauseTOMB_REVOKED)}
	var err error
	if user.Is4() {
		err = h.objs.TombsV4.Put(&bpf.AegisSessionKeyV4{Src: user.As4(), Dst: svc.As4(), Dport: port, Proto: proto}, &v)
	} else {
		err = h.objs.TombsV6.Put(&bpf.AegisSessionKeyV6{Src: user.As16(), Dst: svc.As16(), Dport: port, Proto: proto}, &v)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// noFlow requires that no flow admits src:sport -> dst:dport.
func noFlow(t *testing.T, h *harness, src, dst netip.Addr, sport, dport uint16, proto uint8) {
	t.Helper()
	var v bpf.AegisFlowValue
	var err error
	if src.Is4() {
		k := bpf.AegisFlowKeyV4{Src: src.As4(), Dst: dst.As4(), Sport: sport, Dport: dport, Proto: proto}
		err = h.objs.FlowsV4.Lookup(&k, &v)
	} else {
		k := bpf.AegisFlowKeyV6{Src: src.As16(), Dst: dst.As16(), Sport: sport, Dport: dport, Proto: proto}
		err = h.objs.FlowsV6.Lookup(&k, &v)
	}
	if err == nil {
		t.Fatalf("a flow admits %s:%d -> %s:%d/%d: %+v", src, sport, dst, dport, proto, v)
	}
}

// setupStateful loads the data path with a family's sessions (exact,
// any-protocol, expired) and allow rules (UDP and ICMP from mgmt).
func setupStateful(t *testing.T, a statefulAddrs, cfg state.Config) *harness {
	h := newHarness(t)
	mgmt := netip.PrefixFrom(a.mgmt, a.mgmt.BitLen())
	a4, a6 := h.setAllowRules(t,
		state.AllowRule{Prefix: mgmt, Proto: tu.ProtoUDP},
		state.AllowRule{Prefix: mgmt, Proto: icmpProto(a.mgmt)})
	cfg.DefaultIdleTimeout, cfg.AllowV4Prefixes, cfg.AllowV6Prefixes = time.Minute, a4, a6
	h.setConfig(t, cfg)
	now := state.Now()
	grant := func(port uint16, proto uint8, lastSeen uint64) { grantAt(t, h, a.user, a.svc, port, proto, lastSeen) }
	grant(8080, tu.ProtoTCP, now)
	grant(5353, tu.ProtoUDP, now)
	grant(5400, tu.ProtoUDP, now)
	grant(7000, 0, now)
	grant(7001, tu.ProtoTCP, now-2*hour)
	grant(7001, 0, now)
	grant(7002, 0, now)
	grant(9001, tu.ProtoTCP, now-2*hour)
	return h
}

var (
	stateful4 = statefulAddrs{user: client4, svc: svc4, peer: netip.MustParseAddr("203.0.113.53"),
		other: netip.MustParseAddr("203.0.113.54"), router: netip.MustParseAddr("203.0.113.1"), mgmt: mgmt4}
	stateful6 = statefulAddrs{user: client6, svc: svc6, peer: netip.MustParseAddr("2001:db8:4::53"),
		other: netip.MustParseAddr("2001:db8:4::54"), router: netip.MustParseAddr("2001:db8:4::1"), mgmt: mgmt6}
)

// TestStatefulVerdicts runs each case's frames through the egress and XDP
// programs, untagged, with one VLAN tag and with two; each case uses ports
// of its own, so the tagged runs meet the state the untagged one left.
func TestStatefulVerdicts(t *testing.T) {
	for _, fam := range []struct {
		name string
		a    statefulAddrs
	}{{"ipv4", stateful4}, {"ipv6", stateful6}} {
		t.Run(fam.name, func(t *testing.T) {
			h := setupStateful(t, fam.a, state.Config{})
			for _, tags := range [][]uint16{nil, {0x8100}, {0x88A8, 0x8100}} {
				for _, c := range statefulCases(fam.a) {
					name := c.name
					if len(tags) > 0 {
						name += " vlan" + string(rune('0'+len(tags)))
					}
					t.Run(name, func(t *testing.T) { runSteps(t, h, c.steps, tags) })
				}
			}
		})
	}
}

func runSteps(t *testing.T, h *harness, steps []step, tags []uint16) {
	t.Helper()
	for i, st := range steps {
		switch {
		case st.do != nil:
			st.do(t, h)
		case st.out != nil:
			p := *st.out
			p.VLANs = tags
			b := p.Bytes()
			if ret, err := h.runEgress(b); err != nil || ret != -1 {
				t.Fatalf("step %d: egress returned %d, %v; want TCX_NEXT", i, ret, err)
			}
		default:
			p := *st.in
			p.VLANs = tags
			p.IPID += uint32(len(tags)) << 12 // each run's datagrams are new
			b := p.Bytes()
			action, reason := h.run(t, b)
			if reason != st.reason || action != st.reason.Action() {
				t.Fatalf("step %d: action %d reason %v, want %v\n%s", i, action, reason, st.reason, hex.Dump(b))
			}
		}
	}
}

// With reply tracking off nothing is recorded and no flow passes, while
// ICMP errors about sessions still do.
func TestFlowTrackingOff(t *testing.T) {
	for _, a := range []statefulAddrs{stateful4, stateful6} {
		t.Run(a.user.String(), func(t *testing.T) {
			h := setupStateful(t, a, state.Config{})
			s, p, u := a.svc, a.peer, a.user
			runSteps(t, h, []step{out(seg(s, p, 45000, 443, tcpSYN)), out(echo(s, p, true, 7))}, nil)
			h.setConfig(t, state.Config{NoFlowTracking: true, DefaultIdleTimeout: time.Minute})
			runSteps(t, h, []step{
				out(dgram(s, p, 45001, 53)),
				do(func(t *testing.T, h *harness) { noFlow(t, h, p, s, 53, 45001, tu.ProtoUDP) }),
				in(dgram(p, s, 53, 45001), bpf.ReasonNoSession),
				// Recorded before: not honoured while tracking is off.
				in(seg(p, s, 443, 45000, tcpSYNACK), bpf.ReasonNoSession),
				in(echo(p, s, false, 7), bpf.ReasonNoSession),
				in(icmpErr(a.router, s, icmpType(u, 3, 1), 3, seg(s, p, 45000, 443, tcpSYN), 8), bpf.ReasonNoSession),
				in(icmpErr(a.router, s, icmpType(u, 3, 1), 3, seg(s, u, 8080, 40000, tcpACK), 8), bpf.ReasonICMPRelated),
			}, nil)
		})
	}
}

// A flow lives for its protocol's idle timeout from its last packet in
// either direction, and both programs refresh last_seen only when it is
// older than the refresh granularity.
func TestFlowIdleAndRefresh(t *testing.T) {
	h := setupStateful(t, stateful4, state.Config{})
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Minute, FlowIdleTCP: time.Hour, FlowIdleUDP: time.Minute, FlowIdleICMP: time.Second})
	s, p := stateful4.svc, stateful4.peer
	now := state.Now()
	put := func(sport, dport uint16, proto uint8, lastSeen uint64) bpf.AegisFlowKeyV4 {
		k := bpf.AegisFlowKeyV4{Src: p.As4(), Dst: s.As4(), Sport: sport, Dport: dport, Proto: proto}
		if err := h.objs.FlowsV4.Put(&k, &bpf.AegisFlowValue{LastSeenNs: lastSeen, CreatedNs: lastSeen}); err != nil {
			t.Fatal(err)
		}
		return k
	}
	get := func(k bpf.AegisFlowKeyV4) uint64 {
		var v bpf.AegisFlowValue
		if err := h.objs.FlowsV4.Lookup(&k, &v); err != nil {
			t.Fatal(err)
		}
		return v.LastSeenNs
	}
	put(53, 45100, tu.ProtoUDP, now-uint64(2*time.Minute))
	put(443, 45101, tu.ProtoTCP, now-uint64(2*time.Minute))
	put(0, 9, tu.ProtoICMP, now-uint64(2*time.Second))
	runSteps(t, h, []step{
		in(dgram(p, s, 53, 45100), bpf.ReasonNoSession),
		in(seg(p, s, 443, 45101, tcpACK), bpf.ReasonReply),
		in(echo(p, s, false, 9), bpf.ReasonNoSession),
	}, nil)

	gran := uint64(bpf.RefreshGranularity)
	fresh := state.Now() - gran/2
	k := put(53, 45102, tu.ProtoUDP, fresh)
	runSteps(t, h, []step{in(dgram(p, s, 53, 45102), bpf.ReasonReply), out(dgram(s, p, 45102, 53))}, nil)
	if got := get(k); got != fresh {
		t.Fatalf("last_seen rewritten although only %v old", time.Duration(gran/2))
	}
	for _, st := range []step{in(dgram(p, s, 53, 45102), bpf.ReasonReply), out(dgram(s, p, 45102, 53))} {
		put(53, 45102, tu.ProtoUDP, state.Now()-3*gran)
		before := state.Now() - uint64(state.Tick()) // the program's clock lags by up to a tick
		runSteps(t, h, []step{st}, nil)
		if got, after := get(k), state.Now(); got < before || got > after {
			t.Fatalf("last_seen %d not refreshed to now [%d, %d]", got, before, after)
		}
	}

	// An expired flow counts as absent: a later outbound packet that may
	// open a flow opens a new one; one that may not leaves it expired.
	k = put(443, 45103, tu.ProtoTCP, now-2*hour)
	runSteps(t, h, []step{out(seg(s, p, 45103, 443, tcpACK)), in(seg(p, s, 443, 45103, tcpACK), bpf.ReasonNoSession)}, nil)
	before := state.Now() - uint64(state.Tick())
	runSteps(t, h, []step{out(seg(s, p, 45103, 443, tcpSYN)), in(seg(p, s, 443, 45103, tcpSYNACK), bpf.ReasonReply)}, nil)
	if got := get(k); got < before {
		t.Fatalf("expired flow not recreated: last_seen %d < %d", got, before)
	}
}

func (h *harness) runEgress(pkt []byte) (int32, error) {
	ret, err := h.egress.Run(&ebpf.RunOptions{Data: pkt})
	return int32(ret), err
}
