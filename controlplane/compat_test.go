package controlplane_test

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/proto/session"
)

// ip4 is the compat encoding of an IPv4 address.
func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func TestCompatEncoding(t *testing.T) {
	if got := ip4(netip.MustParseAddr("192.0.2.10")); got != 0xC000020A {
		t.Fatalf("192.0.2.10 encodes as %#x, want 0xC000020A", got)
	}
}

func TestCompatSubmitSession(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, compat := e.controller()
	c := ctx(t)

	ack, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: 0xC000020A, DstIp: ip4(svcA4), DstPort: 8080, Activate: true})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("grant: %v %v", ack, err)
	}
	got := e.dump()
	if len(got) != 1 {
		t.Fatalf("sessions after a compat grant: %v, want one any-protocol session", got)
	}
	s, ok := got[state.Key{Src: client4, Dst: svcA4, Port: 8080, Proto: state.Any}]
	// The user is the client certificate's name; the idle timeout the
	// gateway's default; no lifetime cap.
	if !ok || s.User != "controller" || s.IdleTimeout != 0 || s.Expires != 0 {
		t.Fatalf("any-protocol session: %+v (present %v)", s, ok)
	}
	// Re-grant: still one.
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: true}); err != nil {
		t.Fatal(err)
	}
	if n := len(e.dump()); n != 1 {
		t.Fatalf("%d sessions after a re-grant", n)
	}

	ack, err = compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: false})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("revoke: %v %v", ack, err)
	}
	if n := len(e.dump()); n != 0 {
		t.Fatalf("%d sessions after the revoke", n)
	}
	// Revoking what is not there is not an error.
	ack, err = compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: false})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("second revoke: %v %v", ack, err)
	}
}

func TestCompatUserIsTruncatedCertificateName(t *testing.T) {
	e := newEnv(t, envOptions{})
	long := "controller-with-a-rather-long-name.example.net"
	conn := e.dial(e.client(long))
	if _, err := session.NewSessionManagerClient(conn).SubmitSession(ctx(t),
		&session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: true}); err != nil {
		t.Fatal(err)
	}
	for _, s := range e.dump() {
		if s.User != long[:state.MaxUserLen] {
			t.Fatalf("user %q, want %q", s.User, long[:state.MaxUserLen])
		}
	}
}

func TestCompatMonitorSessions(t *testing.T) {
	e := newEnv(t, envOptions{interval: 100 * time.Millisecond, defIdle: 90 * time.Second})
	agent, compat := e.controller()
	c := ctx(t)
	stream, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	// The first snapshot comes at once, empty.
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.GetSessions()) != 0 {
		t.Fatalf("first snapshot %v", first)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: true}); err != nil {
		t.Fatal(err)
	}
	// A session of the full API with its own idle timeout, and one over
	// IPv6, which the compat API cannot express.
	req := login("alice", other4, svcB4, 22, 0)
	req.IdleTimeout = durationOf(10 * time.Second)
	if _, err := agent.LoginEvent(c, req); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, login("bob", client6, svcA6, 22, 0)); err != nil {
		t.Fatal(err)
	}
	// An expired session is not listed.
	now := state.Now()
	if err := e.maps().Grant(state.Session{Key: state.Key{Src: other4, Dst: svcA4, Port: 1, Proto: state.TCP}, User: "x",
		LastSeen: now, Created: now, Expires: now - 1}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var list *session.SessionList
	for list == nil || len(list.GetSessions()) != 2 {
		if list, err = stream.Recv(); err != nil {
			t.Fatal(err)
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("no snapshot with the two sessions within 2 s; last %v", list)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("snapshot came %v after the grants with a 100 ms interval", d)
	}
	// Sorted by source: 192.0.2.10 then .11. TCP and UDP of the compat
	// grant are one entry.
	want := []struct {
		src, dst netip.Addr
		port     uint32
		left     int32
	}{{client4, svcA4, 8080, 90}, {other4, svcB4, 22, 10}}
	for i, w := range want {
		s := list.GetSessions()[i]
		if s.GetSrcIp() != ip4(w.src) || s.GetDstIp() != ip4(w.dst) || s.GetDstPort() != w.port ||
			s.GetTimeLeft() > w.left || s.GetTimeLeft() < w.left-2 {
			t.Errorf("session %d: %v, want %v", i, s, w)
		}
	}
}

func TestCompatIpChange(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, compat := e.controller()
	c := ctx(t)
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: true}); err != nil {
		t.Fatal(err)
	}
	req := login("alice", other4, svcA4, 443, 0)
	req.MaxLifetime = durationOf(time.Hour)
	if _, err := agent.LoginEvent(c, req); err != nil {
		t.Fatal(err)
	}
	stay := state.Key{Src: other4, Dst: svcB4, Port: 22, Proto: state.TCP}
	if _, err := agent.LoginEvent(c, login("carol", other4, svcB4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	newA := netip.MustParseAddr("198.51.100.30")
	ack, err := compat.IpChange(c, &session.IpChangeList{IpChanges: []*session.IpChangeEvent{{OldIp: ip4(svcA4), NewIp: ip4(newA)}}})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("IpChange: %v %v", ack, err)
	}
	after := e.dump()
	if len(after) != len(before) {
		t.Fatalf("after the move: %v", after)
	}
	for k, s := range before {
		if k.Dst != svcA4 {
			if after[k] != s {
				t.Fatalf("%v changed", k)
			}
			continue
		}
		nk := k
		nk.Dst = newA
		moved, ok := after[nk]
		if !ok || moved.User != s.User || moved.Created != s.Created || moved.Expires != s.Expires || moved.IdleTimeout != s.IdleTimeout {
			t.Fatalf("%v moved to %+v (present %v), was %+v", k, moved, ok, s)
		}
		if _, ok := after[k]; ok {
			t.Fatalf("%v still at the old destination", k)
		}
	}
	if _, ok := after[stay]; !ok {
		t.Fatal("a session to another destination was moved")
	}
	// An empty list changes nothing.
	if ack, err := compat.IpChange(c, &session.IpChangeList{}); err != nil || !ack.GetSuccess() {
		t.Fatalf("empty IpChange: %v %v", ack, err)
	}
}

func TestCompatFullMapRefuses(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 2})
	_, compat := e.controller()
	c := ctx(t)
	// One compat grant takes one slot.
	for port := uint32(1); port <= 2; port++ {
		if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: port, Activate: true}); err != nil {
			t.Fatalf("grant %d of 2: %v", port, err)
		}
	}
	before := e.dump()
	_, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 3, Activate: true})
	if code(err) != codes.ResourceExhausted {
		t.Fatalf("grant on a full map: %v, want ResourceExhausted", err)
	}
	e.sameSessions("after a refused compat grant", before)
}

// A TCP and UDP pair granted by a version before any-protocol sessions is
// closed by the controller's revoke, moved by its IpChange, and listed once
// beside the any-protocol session of the same tuple.
func TestCompatLegacyPair(t *testing.T) {
	e := newEnv(t, envOptions{interval: 100 * time.Millisecond})
	_, compat := e.controller()
	c := ctx(t)
	now := state.Now()
	for _, proto := range []state.Protocol{state.TCP, state.UDP} {
		if err := e.maps().Grant(state.Session{Key: state.Key{Src: client4, Dst: svcA4, Port: 8080, Proto: proto}, User: "controller",
			LastSeen: now, Created: now}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: true}); err != nil {
		t.Fatal(err)
	}
	if n := len(e.dump()); n != 3 {
		t.Fatalf("%d sessions, want the legacy pair and the any-protocol session", n)
	}
	stream, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got := list.GetSessions(); len(got) != 1 || got[0].GetSrcIp() != ip4(client4) || got[0].GetDstPort() != 8080 {
		t.Fatalf("snapshot %v, want the tuple once", got)
	}

	newA := netip.MustParseAddr("198.51.100.30")
	if _, err := compat.IpChange(c, &session.IpChangeList{IpChanges: []*session.IpChangeEvent{{OldIp: ip4(svcA4), NewIp: ip4(newA)}}}); err != nil {
		t.Fatal(err)
	}
	for k := range e.dump() {
		if k.Dst != newA {
			t.Fatalf("%v not moved", k)
		}
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(newA), DstPort: 8080, Activate: false}); err != nil {
		t.Fatal(err)
	}
	if got := e.dump(); len(got) != 0 {
		t.Fatalf("after the revoke: %v", got)
	}
}
