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

// harness is the XDP program loaded with fresh, unpinned maps, run with
// BPF_PROG_TEST_RUN and never attached, in a namespace of its own whose
// routing table the model knows (fib_test.go).
type harness struct {
	prog   *ebpf.Program
	egress *ebpf.Program
	maps   *state.Maps
	objs   *bpf.AegisObjects
	fib    *tu.Routed
}

func newHarness(t testing.TB) *harness {
	t.Helper()
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatalf("load data path: %v", err)
	}
	t.Cleanup(func() { objs.Close() })
	return &harness{
		fib:    newFibNetns(t),
		prog:   objs.AegisXdp,
		egress: objs.AegisEgress,
		objs:   &objs,
		maps: &state.Maps{
			SessionsV4: objs.SessionsV4, SessionsV6: objs.SessionsV6,
			AllowV4: objs.AllowV4, AllowV6: objs.AllowV6,
			Config: objs.Config, Stats: objs.Stats, SweepSeq: objs.SweepSeq,
			TombsV4: objs.TombsV4, TombsV6: objs.TombsV6,
			FlowsV4: objs.FlowsV4, FlowsV6: objs.FlowsV6, PortMarks: objs.PortMarks,
		},
	}
}

func (h *harness) setConfig(t testing.TB, c state.Config) {
	t.Helper()
	v, err := c.Value()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.maps.Config.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
}

// setAllow replaces the allow rules and returns the prefix counts the
// config must carry.
func (h *harness) setAllow(t testing.TB, rules ...string) (v4, v6 uint16) {
	t.Helper()
	return h.setAllowRules(t, tu.AllowRules(t, rules...)...)
}

// setAllowRules is setAllow for rules the parser does not spell (ICMP).
func (h *harness) setAllowRules(t testing.TB, rules ...state.AllowRule) (v4, v6 uint16) {
	t.Helper()
	e := h.setAllowEntries(t, rules...)
	return uint16(len(e.V4)), uint16(len(e.V6))
}

// setAllowEntries writes the entries the loader compiles from rules and
// returns them.
func (h *harness) setAllowEntries(t testing.TB, rules ...state.AllowRule) state.AllowEntries {
	t.Helper()
	e, err := state.CompileAllow(rules)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range e.V4 {
		if err := h.maps.AllowV4.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range e.V6 {
		if err := h.maps.AllowV6.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// putSession writes a session as the data path stores it, for keys
// state.Grant refuses (protocol 0).
func (h *harness) putSession(t testing.TB, key any, v bpf.AegisSessionValue) {
	t.Helper()
	var err error
	switch k := key.(type) {
	case bpf.AegisSessionKeyV4:
		err = h.objs.SessionsV4.Put(&k, &v)
	case bpf.AegisSessionKeyV6:
		err = h.objs.SessionsV6.Put(&k, &v)
	}
	if err != nil {
		t.Fatalf("put session %+v: %v", key, err)
	}
}

func (h *harness) grant(t testing.TB, s state.Session) {
	t.Helper()
	if err := h.maps.Grant(s); err != nil {
		t.Fatalf("grant %v: %v", s.Key, err)
	}
}

// run passes one frame through the program and returns its action and the
// reason whose counter moved (exactly one must).
func (h *harness) run(t testing.TB, pkt []byte) (bpf.Action, bpf.Reason) {
	t.Helper()
	before, err := h.maps.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	ret, err := h.fib.Run(h.prog, pkt)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	after, err := h.maps.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	moved := -1
	for i := range after {
		if d := after[i].Packets - before[i].Packets; d != 0 {
			if moved >= 0 || d != 1 {
				t.Fatalf("more than one counter moved for\n%s", hex.Dump(pkt))
			}
			if got := after[i].Bytes - before[i].Bytes; got != uint64(len(pkt)) {
				t.Fatalf("reason %v counted %d bytes, frame has %d", bpf.Reason(i), got, len(pkt))
			}
			moved = i
		}
	}
	if moved < 0 {
		t.Fatalf("no counter moved for\n%s", hex.Dump(pkt))
	}
	return bpf.Action(ret), bpf.Reason(moved)
}

var (
	client4  = netip.MustParseAddr("192.0.2.10")
	other4   = netip.MustParseAddr("192.0.2.11")
	svc4     = netip.MustParseAddr("198.51.100.10")
	ctl4     = netip.MustParseAddr("198.51.100.5")
	mgmt4    = netip.MustParseAddr("203.0.113.7")
	client6  = netip.MustParseAddr("2001:db8:1::10")
	other6   = netip.MustParseAddr("2001:db8:1::11")
	svc6     = netip.MustParseAddr("2001:db8:2::10")
	ctl6     = netip.MustParseAddr("2001:db8:2::5")
	mgmt6    = netip.MustParseAddr("2001:db8:3::7")
	gw4      = netip.MustParseAddr("192.0.2.1")     // the gateway's, on pub0
	gw6      = netip.MustParseAddr("2001:db8:1::1") // the gateway's, on pub0
	gwLL     = netip.MustParseAddr("fe80::1")
	hour     = uint64(time.Hour)
	ctlPort  = uint16(443)
	grpcPort = uint16(50001)
)

func tcp(src, dst netip.Addr, dport uint16) tu.Frame {
	return tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: dport}
}

func udp(src, dst netip.Addr, dport uint16) tu.Frame {
	return tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoUDP, SrcPort: 40000, DstPort: dport, Payload: 4}
}

// ndp is a neighbour discovery message of the given type, code 0, with
// the hop limit RFC 4861 requires.
func ndp(typ uint8, src, dst netip.Addr) tu.Frame {
	return tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoICMPv6, ICMPType: typ, HopLimit: 255, Payload: 16}
}

func with(f tu.Frame, mod func(*tu.Frame)) tu.Frame { mod(&f); return f }

// edit builds the frame and then lets mod corrupt the bytes.
func edit(f tu.Frame, mod func([]byte) []byte) []byte { return mod(f.Bytes()) }

func TestVerdicts(t *testing.T) {
	now := state.Now()
	session := func(src, dst netip.Addr, port uint16, p state.Protocol) state.Session {
		return state.Session{
			Key:  state.Key{Src: src, Dst: dst, Port: port, Proto: p},
			User: "alice", LastSeen: now, Created: now, IdleTimeout: time.Hour,
		}
	}
	idle := func(s state.Session) state.Session { s.LastSeen = now - 2*hour; return s }
	lifetime := func(s state.Session) state.Session { s.Expires = now - 1; return s }

	type tc struct {
		name   string
		pkt    []byte
		reason bpf.Reason
	}
	const v6hdr = 14 + 40

	v4 := []tc{
		{"session tcp", tcp(client4, svc4, 8080).Bytes(), bpf.ReasonSession},
		{"session udp", udp(client4, svc4, 5353).Bytes(), bpf.ReasonSession},
		{"session one vlan", with(tcp(client4, svc4, 8080), func(f *tu.Frame) { f.VLANs = []uint16{0x8100} }).Bytes(), bpf.ReasonSession},
		{"session qinq", with(tcp(client4, svc4, 8080), func(f *tu.Frame) { f.VLANs = []uint16{0x88A8, 0x8100} }).Bytes(), bpf.ReasonSession},
		{"session ip options", with(tcp(client4, svc4, 8080), func(f *tu.Frame) { f.IPv4Options = 40 }).Bytes(), bpf.ReasonSession},
		{"session first fragment", with(udp(client4, svc4, 5353), func(f *tu.Frame) { f.MoreFragments = true }).Bytes(), bpf.ReasonSession},
		{"controller login", tcp(client4, ctl4, ctlPort).Bytes(), bpf.ReasonController},
		{"controller to the gateway's grpc", tcp(ctl4, gw4, grpcPort).Bytes(), bpf.ReasonController},
		{"controller to the gateway's inside address", tcp(ctl4, netip.MustParseAddr("198.51.100.1"), grpcPort).Bytes(), bpf.ReasonController},
		{"controller to the public subnet broadcast", tcp(ctl4, netip.MustParseAddr("192.0.2.255"), grpcPort).Bytes(), bpf.ReasonController},
		// No route: the stack drops it itself.
		{"controller to an unrouted address", tcp(ctl4, netip.MustParseAddr("203.0.113.250"), grpcPort).Bytes(), bpf.ReasonController},
		{"spoofed controller to a protected host", tcp(ctl4, svc4, grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a host with a neighbour entry", tcp(ctl4, netip.MustParseAddr("198.51.100.2"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller via a gateway route", tcp(ctl4, netip.MustParseAddr("203.0.113.9"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a prohibit route", tcp(ctl4, netip.MustParseAddr("203.0.113.70"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to an unreachable route", tcp(ctl4, netip.MustParseAddr("203.0.113.130"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a blackhole route", tcp(ctl4, netip.MustParseAddr("203.0.113.200"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to multicast", tcp(ctl4, netip.MustParseAddr("224.0.0.1"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"controller to the gateway over udp", udp(ctl4, gw4, grpcPort).Bytes(), bpf.ReasonNoSession},
		{"controller port over udp", udp(client4, ctl4, ctlPort).Bytes(), bpf.ReasonNoSession},
		{"allowlist tcp/22", tcp(mgmt4, svc4, 22).Bytes(), bpf.ReasonAllowlist},
		{"allowlist wrong port", tcp(mgmt4, svc4, 23).Bytes(), bpf.ReasonNoSession},
		{"allowlist udp any port", udp(mgmt4, svc4, 9999).Bytes(), bpf.ReasonAllowlist},
		{"arp", tu.Frame{EtherType: 0x0806}.Bytes(), bpf.ReasonARP},
		{"arp in vlan", tu.Frame{EtherType: 0x0806, VLANs: []uint16{0x8100}}.Bytes(), bpf.ReasonARP},
		{"no session other client", tcp(other4, svc4, 8080).Bytes(), bpf.ReasonNoSession},
		{"no session other port", tcp(client4, svc4, 8081).Bytes(), bpf.ReasonNoSession},
		{"no session other protocol", udp(client4, svc4, 8080).Bytes(), bpf.ReasonNoSession},
		{"expired idle", tcp(client4, svc4, 9001).Bytes(), bpf.ReasonExpired},
		{"expired lifetime", tcp(client4, svc4, 9002).Bytes(), bpf.ReasonExpired},
		{"malformed short ip header", tcp(client4, svc4, 8080).Bytes()[:14+19], bpf.ReasonMalformed},
		{"malformed ip version", edit(tcp(client4, svc4, 8080), func(b []byte) []byte { b[14] = 0x55; return b }), bpf.ReasonMalformed},
		{"malformed ihl below 5", edit(tcp(client4, svc4, 8080), func(b []byte) []byte { b[14] = 0x44; return b }), bpf.ReasonMalformed},
		{"malformed total length beyond frame", edit(tcp(client4, svc4, 8080), func(b []byte) []byte { b[17] += 1; return b }), bpf.ReasonMalformed},
		{"malformed truncated tcp", tcp(client4, svc4, 8080).Bytes()[:14+20+19], bpf.ReasonMalformed},
		{"malformed tcp beyond total length", edit(tcp(client4, svc4, 8080), func(b []byte) []byte {
			b[17] = 20 + 10 // total length ends inside the TCP header; the rest is "padding"
			return b
		}), bpf.ReasonMalformed},
		{"malformed truncated udp", udp(client4, svc4, 5353).Bytes()[:14+20+7], bpf.ReasonMalformed},
		{"malformed truncated vlan", tu.Frame{VLANs: []uint16{0x8100}, EtherType: 0x0800}.Bytes()[:16], bpf.ReasonMalformed},
		{"fragment", with(tcp(client4, svc4, 8080), func(f *tu.Frame) { f.FragOffset = 185 }).Bytes(), bpf.ReasonFragment},
		// Datagram 0 passed its first fragment above; this is another.
		{"last fragment", pkt{Frame: with(udp(client4, svc4, 5353), func(f *tu.Frame) { f.FragOffset = 1 }), IPID: 9}.Bytes(), bpf.ReasonFragment},
		{"unsupported l3 lldp", tu.Frame{EtherType: 0x88CC}.Bytes(), bpf.ReasonUnsupportedL3},
		{"unsupported l3 three tags", with(tcp(client4, svc4, 8080), func(f *tu.Frame) { f.VLANs = []uint16{0x88A8, 0x8100, 0x8100} }).Bytes(), bpf.ReasonUnsupportedL3},
		{"echo request without allow rule", tu.Frame{Src: client4, Dst: svc4, Proto: tu.ProtoICMP, ICMPType: 8}.Bytes(), bpf.ReasonNoSession},
		{"unsupported l4 icmp timestamp", tu.Frame{Src: client4, Dst: svc4, Proto: tu.ProtoICMP, ICMPType: 13}.Bytes(), bpf.ReasonUnsupportedL4},
		{"unsupported l4 sctp", tu.Frame{Src: client4, Dst: svc4, Proto: tu.ProtoSCTP}.Bytes(), bpf.ReasonUnsupportedL4},
	}
	v6 := []tc{
		{"session tcp", tcp(client6, svc6, 8080).Bytes(), bpf.ReasonSession},
		{"session udp", udp(client6, svc6, 5353).Bytes(), bpf.ReasonSession},
		{"session qinq", with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.VLANs = []uint16{0x88A8, 0x8100} }).Bytes(), bpf.ReasonSession},
		{"session ext headers", with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.IPv6Ext = []uint8{0, 60, 43, 51} }).Bytes(), bpf.ReasonSession},
		{"session first fragment", with(udp(client6, svc6, 5353), func(f *tu.Frame) { f.IPv6Ext = []uint8{44}; f.MoreFragments = true }).Bytes(), bpf.ReasonSession},
		{"session six ext headers", with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.IPv6Ext = []uint8{0, 60, 43, 60, 51, 60} }).Bytes(), bpf.ReasonSession},
		{"controller login", tcp(client6, ctl6, ctlPort).Bytes(), bpf.ReasonController},
		{"controller to the gateway's grpc", tcp(ctl6, gw6, grpcPort).Bytes(), bpf.ReasonController},
		{"controller to the gateway's inside address", tcp(ctl6, netip.MustParseAddr("2001:db8:2::1"), grpcPort).Bytes(), bpf.ReasonController},
		{"controller to a link-local address", tcp(ctl6, gwLL, grpcPort).Bytes(), bpf.ReasonController},
		{"spoofed controller to a protected host", tcp(ctl6, svc6, grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a host with a neighbour entry", tcp(ctl6, netip.MustParseAddr("2001:db8:2::2"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller via a gateway route", tcp(ctl6, mgmt6, grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a prohibit route", tcp(ctl6, netip.MustParseAddr("2001:db8:5::1"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to an unreachable route", tcp(ctl6, netip.MustParseAddr("2001:db8:6::1"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to a blackhole route", tcp(ctl6, netip.MustParseAddr("2001:db8:7::1"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"spoofed controller to multicast", tcp(ctl6, netip.MustParseAddr("ff02::1"), grpcPort).Bytes(), bpf.ReasonNoSession},
		{"allowlist tcp/22", tcp(mgmt6, svc6, 22).Bytes(), bpf.ReasonAllowlist},
		{"allowlist wrong port", tcp(mgmt6, svc6, 23).Bytes(), bpf.ReasonNoSession},
		{"allowlist udp any port", udp(mgmt6, svc6, 9999).Bytes(), bpf.ReasonAllowlist},
		{"ndp solicitation to solicited-node multicast", ndp(135, client6, netip.MustParseAddr("ff02::1:ff00:1")).Bytes(), bpf.ReasonNDP},
		{"ndp duplicate address detection", ndp(135, netip.IPv6Unspecified(), netip.MustParseAddr("ff02::1:ff00:10")).Bytes(), bpf.ReasonNDP},
		{"ndp router advertisement to all nodes", ndp(134, netip.MustParseAddr("fe80::2"), netip.MustParseAddr("ff02::1")).Bytes(), bpf.ReasonNDP},
		{"ndp router solicitation to all routers", ndp(133, netip.MustParseAddr("fe80::2"), netip.MustParseAddr("ff02::2")).Bytes(), bpf.ReasonNDP},
		{"ndp solicitation to the gateway's link-local", ndp(135, netip.MustParseAddr("fe80::2"), gwLL).Bytes(), bpf.ReasonNDP},
		{"ndp unicast solicitation to the gateway", ndp(135, client6, gw6).Bytes(), bpf.ReasonNDP},
		{"ndp advertisement to the gateway", ndp(136, client6, gw6).Bytes(), bpf.ReasonNDP},
		{"ndp redirect to link-local", ndp(137, netip.MustParseAddr("fe80::2"), netip.MustParseAddr("fe80::3")).Bytes(), bpf.ReasonNDP},
		{"ndp after hop-by-hop", with(ndp(136, client6, gw6), func(f *tu.Frame) { f.IPv6Ext = []uint8{0} }).Bytes(), bpf.ReasonNDP},
		{"ndp with hop limit 64", with(ndp(136, client6, gw6), func(f *tu.Frame) { f.HopLimit = 64 }).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp with hop limit 254", with(ndp(135, client6, netip.MustParseAddr("ff02::1:ff00:1")), func(f *tu.Frame) { f.HopLimit = 254 }).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp with code 1", with(ndp(135, client6, gw6), func(f *tu.Frame) { f.ICMPCode = 1 }).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp to a protected host", ndp(136, client6, svc6).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp to a protected host, hop limit 64", with(ndp(135, client6, svc6), func(f *tu.Frame) { f.HopLimit = 64 }).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp to an unreachable route", ndp(136, client6, netip.MustParseAddr("2001:db8:6::1")).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp to site-scope multicast", ndp(135, client6, netip.MustParseAddr("ff05::1:ff00:1")).Bytes(), bpf.ReasonUnsupportedL4},
		{"ndp to an unrouted address", ndp(136, client6, netip.MustParseAddr("2001:db8:9::1")).Bytes(), bpf.ReasonNDP},
		{"icmpv6 echo with hop limit 255 to link-local", ndp(128, client6, gwLL).Bytes(), bpf.ReasonNoSession},
		{"no session other client", tcp(other6, svc6, 8080).Bytes(), bpf.ReasonNoSession},
		{"no session other protocol", udp(client6, svc6, 8080).Bytes(), bpf.ReasonNoSession},
		{"expired idle", tcp(client6, svc6, 9001).Bytes(), bpf.ReasonExpired},
		{"expired lifetime", tcp(client6, svc6, 9002).Bytes(), bpf.ReasonExpired},
		{"malformed short header", tcp(client6, svc6, 8080).Bytes()[:v6hdr-1], bpf.ReasonMalformed},
		{"malformed version", edit(tcp(client6, svc6, 8080), func(b []byte) []byte { b[14] = 0x40; return b }), bpf.ReasonMalformed},
		{"malformed payload length beyond frame", edit(tcp(client6, svc6, 8080), func(b []byte) []byte { b[19] += 1; return b }), bpf.ReasonMalformed},
		{"malformed truncated ext header", edit(with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.IPv6Ext = []uint8{0} }), func(b []byte) []byte {
			b = b[:v6hdr+4]
			b[18], b[19] = 0, 4 // payload length: the 4 bytes left
			return b
		}), bpf.ReasonMalformed},
		{"malformed truncated tcp", edit(tcp(client6, svc6, 8080), func(b []byte) []byte {
			b = b[:v6hdr+12]
			b[18], b[19] = 0, 12
			return b
		}), bpf.ReasonMalformed},
		{"malformed truncated icmpv6", edit(tu.Frame{Src: client6, Dst: svc6, Proto: tu.ProtoICMPv6, ICMPType: 135}, func(b []byte) []byte {
			b = b[:v6hdr+3]
			b[18], b[19] = 0, 3
			return b
		}), bpf.ReasonMalformed},
		{"fragment", with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.IPv6Ext = []uint8{44}; f.FragOffset = 185 }).Bytes(), bpf.ReasonFragment},
		// Datagram 0 passed its first fragment above; this is another.
		{"fragment after hop-by-hop", pkt{Frame: with(udp(client6, svc6, 5353), func(f *tu.Frame) { f.IPv6Ext = []uint8{0, 44}; f.FragOffset = 1 }), IPID: 9}.Bytes(), bpf.ReasonFragment},
		{"echo request without allow rule", tu.Frame{Src: client6, Dst: svc6, Proto: tu.ProtoICMPv6, ICMPType: 128}.Bytes(), bpf.ReasonNoSession},
		{"unsupported l4 icmpv6 mld report", tu.Frame{Src: client6, Dst: svc6, Proto: tu.ProtoICMPv6, ICMPType: 143}.Bytes(), bpf.ReasonUnsupportedL4},
		{"unsupported l4 seven ext headers", with(tcp(client6, svc6, 8080), func(f *tu.Frame) { f.IPv6Ext = []uint8{0, 60, 43, 60, 43, 60, 60} }).Bytes(), bpf.ReasonUnsupportedL4},
		{"unsupported l4 no next header", tu.Frame{Src: client6, Dst: svc6, Proto: 59}.Bytes(), bpf.ReasonUnsupportedL4},
	}

	for _, fam := range []struct {
		name                  string
		client, svc, ctl, mgm netip.Addr
		cases                 []tc
	}{
		{"ipv4", client4, svc4, ctl4, mgmt4, v4},
		{"ipv6", client6, svc6, ctl6, mgmt6, v6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			h := newHarness(t)
			bits := 24
			if fam.mgm.Is6() {
				bits = 64
			}
			a4, a6 := h.setAllow(t,
				netip.PrefixFrom(fam.mgm, bits).Masked().String()+",tcp/22",
				fam.mgm.String()+",udp")
			h.setConfig(t, state.Config{
				Controller: fam.ctl, ControllerPort: ctlPort, GRPCPort: grpcPort,
				DefaultIdleTimeout: time.Minute, AllowV4Prefixes: a4, AllowV6Prefixes: a6,
			})
			h.grant(t, session(fam.client, fam.svc, 8080, state.TCP))
			h.grant(t, session(fam.client, fam.svc, 5353, state.UDP))
			h.grant(t, idle(session(fam.client, fam.svc, 9001, state.TCP)))
			h.grant(t, lifetime(session(fam.client, fam.svc, 9002, state.TCP)))

			for _, c := range fam.cases {
				t.Run(c.name, func(t *testing.T) {
					action, reason := h.run(t, c.pkt)
					if reason != c.reason {
						t.Fatalf("reason %v, want %v\n%s", reason, c.reason, hex.Dump(c.pkt))
					}
					want := bpf.XDPDrop
					if c.reason.Pass() {
						want = bpf.XDPPass
					}
					if action != want {
						t.Fatalf("action %d, want %d", action, want)
					}
				})
			}

			// Monitor mode: every would-be drop above passes as "monitor";
			// passes keep their reason.
			h.setConfig(t, state.Config{
				Controller: fam.ctl, ControllerPort: ctlPort, GRPCPort: grpcPort,
				DefaultIdleTimeout: time.Minute, AllowV4Prefixes: a4, AllowV6Prefixes: a6, Monitor: true,
			})
			for _, c := range fam.cases {
				t.Run("monitor "+c.name, func(t *testing.T) {
					want := c.reason
					if !want.Pass() {
						want = bpf.ReasonMonitor
					}
					action, reason := h.run(t, c.pkt)
					if reason != want || action != bpf.XDPPass {
						t.Fatalf("got action %d reason %v, want pass %v", action, reason, want)
					}
				})
			}
		})
	}
}

// The controller bypass follows the config's family; with no controller
// configured nothing bypasses.
func TestControllerBypassNeedsConfig(t *testing.T) {
	h := newHarness(t)
	h.setConfig(t, state.Config{ControllerPort: ctlPort, GRPCPort: grpcPort, DefaultIdleTimeout: time.Minute})
	for _, pkt := range [][]byte{tcp(client4, ctl4, ctlPort).Bytes(), tcp(client6, ctl6, ctlPort).Bytes()} {
		if _, r := h.run(t, pkt); r != bpf.ReasonNoSession {
			t.Fatalf("reason %v without a controller, want no_session", r)
		}
	}
}

// A session without its own idle timeout uses the config's default.
func TestDefaultIdleTimeout(t *testing.T) {
	h := newHarness(t)
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Minute})
	now := state.Now()
	s := state.Session{Key: state.Key{Src: client4, Dst: svc4, Port: 8080, Proto: state.TCP}, User: "bob", LastSeen: now - uint64(2*time.Minute)}
	h.grant(t, s)
	if _, r := h.run(t, tcp(client4, svc4, 8080).Bytes()); r != bpf.ReasonExpired {
		t.Fatalf("idle 2m with a 1m default: %v, want expired", r)
	}
	h.setConfig(t, state.Config{DefaultIdleTimeout: 3 * time.Minute})
	if _, r := h.run(t, tcp(client4, svc4, 8080).Bytes()); r != bpf.ReasonSession {
		t.Fatalf("idle 2m with a 3m default: %v, want session", r)
	}
}

// last_seen is written only when stale by more than the refresh
// granularity, and then to the current time.
func TestLastSeenRefresh(t *testing.T) {
	h := newHarness(t)
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Minute})
	key := state.Key{Src: client6, Dst: svc6, Port: 8080, Proto: state.TCP}
	pkt := tcp(client6, svc6, 8080).Bytes()
	gran := uint64(bpf.RefreshGranularity)

	now := state.Now()
	fresh := now - gran/2
	h.grant(t, state.Session{Key: key, User: "carol", LastSeen: fresh})
	h.run(t, pkt)
	s, err := h.maps.Lookup(key)
	if err != nil {
		t.Fatal(err)
	}
	if s.LastSeen != fresh {
		t.Fatalf("last_seen rewritten although only %v old", time.Duration(gran/2))
	}

	stale := state.Now() - 3*gran
	h.grant(t, state.Session{Key: key, User: "carol", LastSeen: stale})
	before := state.Now() - uint64(state.Tick()) // the program's clock lags by up to a tick
	h.run(t, pkt)
	after := state.Now()
	if s, err = h.maps.Lookup(key); err != nil {
		t.Fatal(err)
	}
	if s.LastSeen < before || s.LastSeen > after {
		t.Fatalf("last_seen %d not refreshed to now [%d, %d]", s.LastSeen, before, after)
	}
}

// Frames larger than a page reach the program as several buffers (here as
// BPF_PROG_TEST_RUN builds them): the headers are in the first, and the IP
// length checks must count the whole frame.
func TestMultiBufferFrames(t *testing.T) {
	h := newHarness(t)
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Minute})
	now := state.Now()
	for _, k := range []state.Key{
		{Src: client4, Dst: svc4, Port: 5353, Proto: state.UDP},
		{Src: client6, Dst: svc6, Port: 5353, Proto: state.UDP},
	} {
		h.grant(t, state.Session{Key: k, User: "jumbo", LastSeen: now, IdleTimeout: time.Hour})
	}
	for _, c := range []struct {
		name   string
		pkt    []byte
		reason bpf.Reason
	}{
		{"ipv4 9000 bytes", with(udp(client4, svc4, 5353), func(f *tu.Frame) { f.Payload = 8950 }).Bytes(), bpf.ReasonSession},
		{"ipv6 9000 bytes", with(udp(client6, svc6, 5353), func(f *tu.Frame) { f.Payload = 8930 }).Bytes(), bpf.ReasonSession},
		{"ipv4 9000 bytes, no session", with(udp(client4, svc4, 5354), func(f *tu.Frame) { f.Payload = 8950 }).Bytes(), bpf.ReasonNoSession},
		{"ipv4 total length beyond the frame", edit(with(udp(client4, svc4, 5353), func(f *tu.Frame) { f.Payload = 8950 }),
			func(b []byte) []byte { return b[:len(b)-1] }), bpf.ReasonMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			if len(c.pkt) <= 4096 {
				t.Fatalf("frame of %d bytes fits one page", len(c.pkt))
			}
			_, reason := h.run(t, c.pkt)
			if reason != c.reason {
				t.Fatalf("reason %v, want %v", reason, c.reason)
			}
			if want, _ := bpf.Verdict(c.pkt, &bpf.Env{}); c.reason == bpf.ReasonMalformed && want != bpf.XDPDrop {
				t.Fatal("the model disagrees")
			}
		})
	}
}

// With forwarding off on the ingress interface the routing table's answer
// is FWD_DISABLED, which says nothing about the destination: the bypasses
// that need a local destination fail closed, as the model does with no
// Local. Neighbour discovery to link-local and link-scope multicast
// destinations, which needs no lookup, still passes.
func TestBypassesWithoutForwarding(t *testing.T) {
	h := newHarness(t)
	h.fib.NS.Run(t, "sysctl", "-qw", "net.ipv4.conf.pub0.forwarding=0", "net.ipv6.conf.pub0.forwarding=0")
	for _, ctl := range []netip.Addr{ctl4, ctl6} {
		cfg := state.Config{Controller: ctl, ControllerPort: ctlPort, GRPCPort: grpcPort, DefaultIdleTimeout: time.Minute}
		h.setConfig(t, cfg)
		v, _ := cfg.Value()
		env := &bpf.Env{Config: v}
		client, gw := client4, gw4
		if ctl.Is6() {
			client, gw = client6, gw6
		}
		for _, c := range []struct {
			name   string
			pkt    []byte
			reason bpf.Reason
		}{
			{"controller to the gateway", tcp(ctl, gw, grpcPort).Bytes(), bpf.ReasonNoSession},
			{"login", tcp(client, ctl, ctlPort).Bytes(), bpf.ReasonController},
			{"ndp advertisement to the gateway", ndp(136, client6, gw6).Bytes(), bpf.ReasonUnsupportedL4},
			{"ndp solicitation to solicited-node multicast", ndp(135, client6, netip.MustParseAddr("ff02::1:ff00:1")).Bytes(), bpf.ReasonNDP},
			{"ndp advertisement to link-local", ndp(136, netip.MustParseAddr("fe80::2"), gwLL).Bytes(), bpf.ReasonNDP},
		} {
			_, got := h.run(t, c.pkt)
			_, model := bpf.Verdict(c.pkt, env)
			if got != c.reason || model != c.reason {
				t.Errorf("%v controller, %s: program %v, model %v, want %v", ctl, c.name, got, model, c.reason)
			}
		}
	}
}
