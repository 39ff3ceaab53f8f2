package bpf_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// The port marks only ever skip a lookup that could not find anything:
// while they are untrusted every lookup is made; once trusted, a session
// written through internal/state passes (it marks first), and one written
// behind its back (as a daemon of a build without marks would) does not,
// until the marks are distrusted. Flows the egress program creates are
// marked by it.
func TestPortMarks(t *testing.T) {
	peer4 := netip.MustParseAddr("203.0.113.53") // a server on the public side
	h := newHarness(t)
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Hour})
	now := state.Now()
	session := bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: hour}
	expect := func(what string, f tu.Frame, want bpf.Reason) {
		t.Helper()
		if _, r := h.run(t, f.Bytes()); r != want {
			t.Fatalf("%s: %v, want %v", what, r, want)
		}
	}

	// Written behind state's back: no mark.
	h.putSession(t, bpf.AegisSessionKeyV4{Src: client4.As4(), Dst: svc4.As4(), Dport: 8080, Proto: tu.ProtoTCP}, session)
	expect("unmarked session, marks untrusted", tcp(client4, svc4, 8080), bpf.ReasonSession)

	// The control plane's start: every session's port marked, then trusted.
	if set, err := h.maps.TrustSessionMarks(); err != nil || !set {
		t.Fatalf("trust session marks: %v %v", set, err)
	}
	if set, err := h.maps.TrustSessionMarks(); err != nil || set {
		t.Fatalf("trusting again: %v %v, want nothing to do", set, err)
	}
	expect("session marked by the trust", tcp(client4, svc4, 8080), bpf.ReasonSession)

	h.putSession(t, bpf.AegisSessionKeyV4{Src: client4.As4(), Dst: svc4.As4(), Dport: 8081, Proto: tu.ProtoTCP}, session)
	h.putSession(t, bpf.AegisSessionKeyV4{Src: client4.As4(), Dst: svc4.As4(), Dport: 8082}, session) // any protocol
	expect("unmarked session, marks trusted", tcp(client4, svc4, 8081), bpf.ReasonNoSession)
	expect("unmarked any-protocol session, marks trusted", udp(client4, svc4, 8082), bpf.ReasonNoSession)

	// Written through state: marked before it is written.
	h.grant(t, state.Session{Key: state.Key{Src: client6, Dst: svc6, Port: 9090, Proto: state.UDP}, User: "dave", LastSeen: now})
	expect("granted session, marks trusted", udp(client6, svc6, 9090), bpf.ReasonSession)
	expect("its port, another protocol", tcp(client6, svc6, 9090), bpf.ReasonNoSession)

	// A load distrusts them: every lookup again.
	if err := state.DistrustMarks(h.objs.PortMarks); err != nil {
		t.Fatal(err)
	}
	expect("unmarked session after a load", tcp(client4, svc4, 8081), bpf.ReasonSession)
	expect("unmarked any-protocol session after a load", udp(client4, svc4, 8082), bpf.ReasonSession)

	// Flows: the egress program marks the ones it creates; the loader marks
	// the rest and trusts.
	h.setConfig(t, state.Config{DefaultIdleTimeout: time.Hour, FlowIdleTCP: time.Hour, FlowIdleUDP: time.Hour, FlowIdleICMP: time.Hour})
	peer := tu.Frame{Src: svc4, Dst: peer4, Proto: tu.ProtoUDP, SrcPort: 45000, DstPort: 53, Payload: 4}
	if _, err := h.runEgress(peer.Bytes()); err != nil {
		t.Fatal(err)
	}
	seeded := bpf.AegisFlowKeyV4{Src: peer4.As4(), Dst: svc4.As4(), Sport: 53, Dport: 45001, Proto: tu.ProtoUDP}
	if err := h.objs.FlowsV4.Put(&seeded, &bpf.AegisFlowValue{LastSeenNs: now, CreatedNs: now}); err != nil {
		t.Fatal(err)
	}
	if err := state.TrustFlowMarks(h.objs.PortMarks, h.objs.FlowsV4, h.objs.FlowsV6); err != nil {
		t.Fatal(err)
	}
	reply := func(dport uint16) tu.Frame {
		return tu.Frame{Src: peer4, Dst: svc4, Proto: tu.ProtoUDP, SrcPort: 53, DstPort: dport, Payload: 4}
	}
	expect("reply to the program's flow", reply(45000), bpf.ReasonReply)
	expect("reply to a flow the loader marked", reply(45001), bpf.ReasonReply)
	unmarked := bpf.AegisFlowKeyV4{Src: peer4.As4(), Dst: svc4.As4(), Sport: 53, Dport: 45002, Proto: tu.ProtoUDP}
	if err := h.objs.FlowsV4.Put(&unmarked, &bpf.AegisFlowValue{LastSeenNs: now, CreatedNs: now}); err != nil {
		t.Fatal(err)
	}
	expect("reply to a flow written after the trust, unmarked", reply(45002), bpf.ReasonNoSession)
}
