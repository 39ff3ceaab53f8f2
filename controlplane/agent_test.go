package controlplane_test

import (
	"encoding/json"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

var (
	client4 = netip.MustParseAddr("192.0.2.10")
	other4  = netip.MustParseAddr("192.0.2.11")
	svcA4   = netip.MustParseAddr("198.51.100.10")
	svcB4   = netip.MustParseAddr("198.51.100.20")
	client6 = netip.MustParseAddr("2001:db8:1::10")
	svcA6   = netip.MustParseAddr("2001:db8:2::10")
)

func login(user string, src, dst netip.Addr, port uint32, proto agentv1.Protocol) *agentv1.LoginEventRequest {
	return &agentv1.LoginEventRequest{User: user, SrcIp: src.String(), DstIp: dst.String(), DstPort: port, Protocol: proto}
}

func code(err error) codes.Code { return status.Code(err) }

func TestAgentLoginEvent(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	c := ctx(t)

	req := login("alice", client4, svcA4, 8080, agentv1.Protocol_PROTOCOL_UNSPECIFIED)
	req.IdleTimeout = durationpb.New(30 * time.Second)
	req.MaxLifetime = durationpb.New(time.Hour)
	before := state.Now()
	resp, err := agent.LoginEvent(c, req)
	if err != nil {
		t.Fatal(err)
	}
	// Acknowledged means in the map, now.
	k := state.Key{Src: client4, Dst: svcA4, Port: 8080, Proto: state.TCP}
	s, err := e.maps().Lookup(k)
	if err != nil {
		t.Fatalf("granted session not in the map: %v", err)
	}
	if !resp.GetCreated() || s.User != "alice" || s.IdleTimeout != 30*time.Second ||
		s.Expires < before+uint64(time.Hour) || s.Expires > state.Now()+uint64(time.Hour) || s.Created < before {
		t.Fatalf("response %v, map %+v", resp, s)
	}
	rs := resp.GetSession()
	if rs.GetUser() != "alice" || rs.GetSrcIp() != "192.0.2.10" || rs.GetDstIp() != "198.51.100.10" || rs.GetDstPort() != 8080 ||
		rs.GetProtocol() != agentv1.Protocol_PROTOCOL_TCP || rs.GetIdleTimeout().AsDuration() != 30*time.Second ||
		rs.GetExpireTime() == nil || rs.GetExpired() || rs.GetTimeLeft().AsDuration() > 30*time.Second || rs.GetTimeLeft().AsDuration() < 29*time.Second {
		t.Fatalf("response session %v", rs)
	}

	// A re-grant refreshes: no duplicate, creation time kept, timeouts
	// and lifetime replaced.
	req2 := login("alice", client4, svcA4, 8080, agentv1.Protocol_PROTOCOL_TCP)
	resp, err = agent.LoginEvent(c, req2)
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := e.maps().Lookup(k)
	if resp.GetCreated() || s2.Created != s.Created || s2.User != "alice" || s2.IdleTimeout != 0 || s2.Expires != 0 || s2.LastSeen < s.LastSeen {
		t.Fatalf("after re-grant: response %v, map %+v (was %+v)", resp, s2, s)
	}
	if got := resp.GetSession().GetIdleTimeout().AsDuration(); got != time.Minute {
		t.Fatalf("idle timeout reported %v, want the config default 1m", got)
	}
	if n := len(e.dump()); n != 1 {
		t.Fatalf("%d sessions after a re-grant, want 1", n)
	}

	// IPv6, UDP.
	if _, err := agent.LoginEvent(c, login("bob", client6, svcA6, 53, agentv1.Protocol_PROTOCOL_UDP)); err != nil {
		t.Fatal(err)
	}
	if s, err := e.maps().Lookup(state.Key{Src: client6, Dst: svcA6, Port: 53, Proto: state.UDP}); err != nil || s.User != "bob" {
		t.Fatalf("IPv6 session: %+v %v", s, err)
	}

	// One audit line per grant, naming user, key, peer and result.
	var found bool
	for _, line := range strings.Split(e.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil || m["audit"] != "grant" || m["user"] != "bob" {
			continue
		}
		found = true
		want := map[string]any{"message": "grant", "api": "agent", "proto": "udp", "src": "2001:db8:1::10", "dst": "2001:db8:2::10",
			"dport": float64(53), "peer": "controller", "result": "created", "level": "info"}
		for f, v := range want {
			if m[f] != v {
				t.Errorf("audit line field %s = %v, want %v: %s", f, m[f], v, line)
			}
		}
		if !strings.HasPrefix(m["peer_address"].(string), "127.0.0.1:") {
			t.Errorf("audit peer_address %v", m["peer_address"])
		}
	}
	if !found {
		t.Fatalf("no audit line for bob's grant in:\n%s", e.logs.String())
	}
}

func TestAgentStreamLoginEvents(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	stream, err := agent.StreamLoginEvents(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	reqs := []*agentv1.LoginEventRequest{
		login("u1", client4, svcA4, 1, agentv1.Protocol_PROTOCOL_TCP),
		login("", client4, svcA4, 2, agentv1.Protocol_PROTOCOL_TCP), // rejected: no user
		login("u1", client4, svcA4, 3, agentv1.Protocol_PROTOCOL_UDP),
		login("u2", client6, svcA6, 4, agentv1.Protocol_PROTOCOL_TCP),
		login("u2", client6, svcA4, 5, agentv1.Protocol_PROTOCOL_TCP), // rejected: mixed families
		login("u1", client4, svcA4, 1, agentv1.Protocol_PROTOCOL_TCP), // a refresh
	}
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetApplied() != 4 || resp.GetRejected() != 2 || len(resp.GetRejections()) != 2 {
		t.Fatalf("response %v", resp)
	}
	for i, want := range []uint64{1, 4} {
		r := resp.GetRejections()[i]
		if r.GetIndex() != want || codes.Code(r.GetCode()) != codes.InvalidArgument || r.GetMessage() == "" {
			t.Errorf("rejection %d: %v", i, r)
		}
	}
	if n := len(e.dump()); n != 3 {
		t.Fatalf("%d sessions, want 3", n)
	}
}

func TestAgentLogoutEvent(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	c := ctx(t)
	for _, r := range []*agentv1.LoginEventRequest{
		login("alice", client4, svcA4, 22, agentv1.Protocol_PROTOCOL_TCP),
		login("alice", client4, svcA4, 53, agentv1.Protocol_PROTOCOL_UDP),
		login("alice", client6, svcA6, 443, agentv1.Protocol_PROTOCOL_TCP),
		login("bob", other4, svcA4, 22, agentv1.Protocol_PROTOCOL_TCP),
	} {
		if _, err := agent.LoginEvent(c, r); err != nil {
			t.Fatal(err)
		}
	}
	bobKey := state.Key{Src: other4, Dst: svcA4, Port: 22, Proto: state.TCP}

	// By key, with the wrong user: refused, kept.
	_, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice", SrcIp: other4.String(), DstIp: svcA4.String(), DstPort: 22})
	if code(err) != codes.NotFound {
		t.Fatalf("logout of bob's session as alice: %v, want NotFound", err)
	}
	if _, err := e.maps().Lookup(bobKey); err != nil {
		t.Fatalf("bob's session was revoked: %v", err)
	}
	// By key (protocol unspecified means TCP).
	resp, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{SrcIp: other4.String(), DstIp: svcA4.String(), DstPort: 22})
	if err != nil || resp.GetRevoked() != 1 {
		t.Fatalf("logout by key: %v %v", resp, err)
	}
	if _, err := e.maps().Lookup(bobKey); err == nil {
		t.Fatal("bob's session is still in the map")
	}
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{SrcIp: other4.String(), DstIp: svcA4.String(), DstPort: 22}); code(err) != codes.NotFound {
		t.Fatalf("second logout: %v, want NotFound", err)
	}
	// By key and the right user.
	resp, err = agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice", SrcIp: client4.String(), DstIp: svcA4.String(),
		DstPort: 53, Protocol: agentv1.Protocol_PROTOCOL_UDP})
	if err != nil || resp.GetRevoked() != 1 {
		t.Fatalf("logout by key and user: %v %v", resp, err)
	}
	// Every session of a user, both families.
	resp, err = agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"})
	if err != nil || resp.GetRevoked() != 2 {
		t.Fatalf("logout of a user: %v %v", resp, err)
	}
	if n := len(e.dump()); n != 0 {
		t.Fatalf("%d sessions left", n)
	}
	resp, err = agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"})
	if err != nil || resp.GetRevoked() != 0 {
		t.Fatalf("logout of a user without sessions: %v %v", resp, err)
	}
}

func TestAgentListSessionsAndStats(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 1000})
	agent, _ := e.controller()
	c := ctx(t)
	for _, r := range []*agentv1.LoginEventRequest{
		login("alice", client4, svcA4, 22, agentv1.Protocol_PROTOCOL_TCP),
		login("alice", client4, svcB4, 22, agentv1.Protocol_PROTOCOL_TCP),
		login("bob", other4, svcA4, 80, agentv1.Protocol_PROTOCOL_UDP),
		login("carol", client6, svcA6, 443, agentv1.Protocol_PROTOCOL_TCP),
	} {
		if _, err := agent.LoginEvent(c, r); err != nil {
			t.Fatal(err)
		}
	}
	// An expired session (past its lifetime) is listed as such.
	now := state.Now()
	if err := e.maps().Grant(state.Session{Key: state.Key{Src: other4, Dst: svcB4, Port: 9, Proto: state.TCP}, User: "dave",
		Created: now, LastSeen: now, Expires: now - 1}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req     *agentv1.ListSessionsRequest
		users   string
		matched uint64
	}{
		// Key order: IPv4 before IPv6, then source, destination, port.
		{&agentv1.ListSessionsRequest{}, "alice alice bob dave carol", 5},
		{&agentv1.ListSessionsRequest{User: "alice"}, "alice alice", 2},
		{&agentv1.ListSessionsRequest{SrcIp: other4.String()}, "bob dave", 2},
		{&agentv1.ListSessionsRequest{DstIp: svcA4.String()}, "alice bob", 2},
		{&agentv1.ListSessionsRequest{DstIp: svcA6.String(), DstPort: 443}, "carol", 1},
		{&agentv1.ListSessionsRequest{DstPort: 22}, "alice alice", 2},
		{&agentv1.ListSessionsRequest{Limit: 2}, "alice alice", 5},
		{&agentv1.ListSessionsRequest{User: "nobody"}, "", 0},
	} {
		resp, err := agent.ListSessions(c, tc.req)
		if err != nil {
			t.Fatalf("%v: %v", tc.req, err)
		}
		var users []string
		for _, s := range resp.GetSessions() {
			users = append(users, s.GetUser())
		}
		if strings.Join(users, " ") != tc.users || resp.GetMatched() != tc.matched {
			t.Errorf("%v: users %q matched %d, want %q %d", tc.req, users, resp.GetMatched(), tc.users, tc.matched)
		}
	}
	resp, _ := agent.ListSessions(c, &agentv1.ListSessionsRequest{User: "dave"})
	if s := resp.GetSessions()[0]; !s.GetExpired() || s.GetTimeLeft().AsDuration() != 0 || s.GetExpireTime() == nil {
		t.Fatalf("expired session listed as %v", s)
	}
	resp, _ = agent.ListSessions(c, &agentv1.ListSessionsRequest{User: "carol"})
	if s := resp.GetSessions()[0]; s.GetExpired() || s.GetSrcIp() != "2001:db8:1::10" || s.GetProtocol() != agentv1.Protocol_PROTOCOL_TCP ||
		time.Since(s.GetCreateTime().AsTime()) > time.Minute || time.Since(s.GetCreateTime().AsTime()) < 0 || s.GetExpireTime() != nil {
		t.Fatalf("carol's session listed as %v", s)
	}

	stats, err := agent.GetStats(c, &agentv1.GetStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if stats.GetSessionsV4().GetEntries() != 4 || stats.GetSessionsV4().GetCapacity() != 1000 ||
		stats.GetSessionsV6().GetEntries() != 1 || stats.GetSessionsV6().GetCapacity() != 1000 ||
		stats.GetDefaultIdleTimeout().AsDuration() != time.Minute || stats.GetMonitor() {
		t.Fatalf("stats %v", stats)
	}
	reasons := map[string]string{}
	for _, ct := range stats.GetCounters() {
		reasons[ct.GetReason()] = ct.GetVerdict()
	}
	if len(reasons) != len(state.Reasons) || reasons["session"] != "pass" || reasons["no_session"] != "drop" {
		t.Fatalf("counters %v", stats.GetCounters())
	}
}

// Client streams end with their response even when the client half-closes
// at once.
func TestAgentStreamEmpty(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	stream, err := agent.StreamLoginEvents(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.CloseAndRecv()
	if err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if resp.GetApplied() != 0 || resp.GetRejected() != 0 {
		t.Fatalf("%v", resp)
	}
}

// A hostile client cannot fill the log: the fields of a refused request
// are cut short in the audit line and in the error.
func TestRefusedFieldsAreClipped(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	huge := strings.Repeat("x", 100_000)
	_, err := agent.LoginEvent(ctx(t), &agentv1.LoginEventRequest{User: huge, SrcIp: huge, DstIp: huge, DstPort: 1})
	if code(err) != codes.InvalidArgument || len(status.Convert(err).Message()) > 200 {
		t.Fatalf("error %d bytes: %.200v", len(status.Convert(err).Message()), err)
	}
	_, err = agent.LoginEvent(ctx(t), &agentv1.LoginEventRequest{User: "alice", SrcIp: huge, DstIp: huge, DstPort: 1})
	if code(err) != codes.InvalidArgument || len(status.Convert(err).Message()) > 200 {
		t.Fatalf("error %d bytes: %.200v", len(status.Convert(err).Message()), err)
	}
	if n := len(e.logs.String()); n > 10_000 {
		t.Fatalf("the log grew to %d bytes", n)
	}
}

// PROTOCOL_ANY grants one session of protocol 0, listed as PROTOCOL_ANY
// and revoked by that key alone.
func TestAgentAnyProtocol(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	c := ctx(t)
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 8080, agentv1.Protocol_PROTOCOL_ANY)); err != nil {
		t.Fatal(err)
	}
	got := e.dump()
	if s, ok := got[state.Key{Src: client4, Dst: svcA4, Port: 8080, Proto: state.Any}]; len(got) != 1 || !ok || s.User != "alice" {
		t.Fatalf("sessions %v, want one any-protocol session", got)
	}
	list, err := agent.ListSessions(c, &agentv1.ListSessionsRequest{})
	if err != nil || len(list.GetSessions()) != 1 || list.GetSessions()[0].GetProtocol() != agentv1.Protocol_PROTOCOL_ANY {
		t.Fatalf("ListSessions: %v %v", list, err)
	}
	// The TCP key is another session: revoking it finds none and leaves
	// this one.
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{SrcIp: client4.String(), DstIp: svcA4.String(), DstPort: 8080}); code(err) != codes.NotFound {
		t.Fatalf("revoking the TCP key: %v, want NotFound", err)
	}
	if n := len(e.dump()); n != 1 {
		t.Fatalf("%d sessions after revoking the TCP key", n)
	}
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{SrcIp: client4.String(), DstIp: svcA4.String(), DstPort: 8080,
		Protocol: agentv1.Protocol_PROTOCOL_ANY}); err != nil {
		t.Fatal(err)
	}
	if n := len(e.dump()); n != 0 {
		t.Fatalf("%d sessions after revoking the any-protocol key", n)
	}
}
