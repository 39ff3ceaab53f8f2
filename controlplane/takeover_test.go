package controlplane_test

import (
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// grantLine returns the audit line of the grant of key k to user, failing
// t unless there is exactly one.
func grantLine(t *testing.T, e *env, user string, k state.Key) map[string]any {
	t.Helper()
	var found []map[string]any
	for _, l := range e.logs.JSONLines(t, "grant") {
		if l["user"] == user && l["src"] == k.Src.String() && l["dst"] == k.Dst.String() && l["dport"] == float64(k.Port) && l["proto"] == k.Proto.String() {
			found = append(found, l)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d audit lines of the grant of %v to %s, want 1:\n%s", len(found), k, user, e.logs.String())
	}
	return found[0]
}

func TestTakeoverOfALiveSessionIsRefused(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, compat := e.controller()
	c := ctx(t)
	k := state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.TCP}
	req := login("alice", client4, svcA4, 22, 0)
	req.IdleTimeout, req.MaxLifetime = durationOf(30*time.Second), durationOf(time.Hour)
	if _, err := agent.LoginEvent(c, req); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	_, err := agent.LoginEvent(c, login("bob", client4, svcA4, 22, 0))
	if code(err) != codes.AlreadyExists || !strings.Contains(status.Convert(err).Message(), `"alice"`) {
		t.Fatalf("bob's grant of alice's session: %v, want AlreadyExists naming alice", err)
	}
	e.sameSessions("after the refused takeover", before) // alice's, with her timers
	l := grantLine(t, e, "bob", k)
	if l["previous_user"] != "alice" || l["result"] != "conflict" || l["level"] != "warn" || l["peer"] != "controller" {
		t.Errorf("audit line of the refused takeover: %v", l)
	}

	// In a stream, the refusal is one rejection; the rest is applied.
	stream, err := agent.StreamLoginEvents(c)
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(login("bob", client4, svcA4, 22, 0))
	_ = stream.Send(login("bob", client4, svcA4, 23, 0))
	resp, err := stream.CloseAndRecv()
	if err != nil || resp.GetApplied() != 1 || resp.GetRejected() != 1 || codes.Code(resp.GetRejections()[0].GetCode()) != codes.AlreadyExists {
		t.Fatalf("stream with a takeover: %v %v", resp, err)
	}
	if s, _ := e.maps().Lookup(k); s != before[k] {
		t.Fatalf("alice's session after the streamed takeover: %+v, want %+v", s, before[k])
	}

	// The compat API's user is the client's name: its grant of the tuple
	// alice holds over TCP opens neither protocol.
	_, err = compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: true})
	if code(err) != codes.AlreadyExists {
		t.Fatalf("compat grant of alice's session: %v, want AlreadyExists", err)
	}
	if _, err := e.maps().Lookup(state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.UDP}); err == nil {
		t.Fatal("the refused compat grant opened UDP")
	}
	if s, _ := e.maps().Lookup(k); s != before[k] {
		t.Fatalf("alice's session after the compat grant: %+v", s)
	}
	anyKey := k
	anyKey.Proto = state.Any
	if _, err := e.maps().Lookup(anyKey); err == nil {
		t.Fatal("the refused compat grant opened the tuple")
	}
	if l := grantLine(t, e, "controller", anyKey); l["previous_user"] != "alice" || l["result"] != "conflict" || l["api"] != "compat" {
		t.Errorf("audit line of the refused compat takeover: %v", l)
	}
	// And the other way round: a compat session is the client's.
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(other4), DstIp: ip4(svcA4), DstPort: 80, Activate: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, login("alice", other4, svcA4, 80, agentv1.Protocol_PROTOCOL_UDP)); code(err) != codes.AlreadyExists {
		t.Fatalf("agent grant of a compat session: %v, want AlreadyExists", err)
	}

	// Alice's own refresh goes through; after her logout bob may have it.
	if resp, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0)); err != nil || resp.GetCreated() {
		t.Fatalf("alice's refresh: %v %v", resp, err)
	}
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"}); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, login("bob", client4, svcA4, 22, 0)); err != nil {
		t.Fatalf("bob's grant after alice's logout: %v", err)
	}
	if v := value(t, gather(t, e), "aegis_controlplane_grants_total", "api=agent", "result=conflict"); v != 3 {
		t.Errorf("grants_total{agent,conflict} = %v, want 3", v)
	}
}

func TestTakeoverAllowedByFlag(t *testing.T) {
	e := newEnv(t, envOptions{takeover: true})
	agent, _ := e.controller()
	c := ctx(t)
	k := state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.TCP}
	// Alice's live session, created a while ago (the data path's clock
	// is coarse: a grant of now might share its creation time).
	now := state.Now()
	alice := state.Session{Key: k, User: "alice", Created: now - uint64(10*time.Second), LastSeen: now,
		IdleTimeout: 30 * time.Second, Expires: now + uint64(time.Hour)}
	if err := e.maps().Grant(alice); err != nil {
		t.Fatal(err)
	}
	start := state.Now()
	resp, err := agent.LoginEvent(c, login("bob", client4, svcA4, 22, 0))
	if err != nil {
		t.Fatalf("takeover with --allow-session-takeover: %v", err)
	}
	if !resp.GetCreated() || resp.GetSession().GetUser() != "bob" {
		t.Fatalf("takeover response %v: want created, bob's", resp)
	}
	// Bob's session is his own: none of alice's timers.
	s := e.dump()[k]
	if s.User != "bob" || s.Created < start || s.Expires != 0 || s.IdleTimeout != 0 {
		t.Fatalf("session after the takeover: user %q created %d (grant at %d) expires %d idle %v; alice's created %d",
			s.User, s.Created, start, s.Expires, s.IdleTimeout, alice.Created)
	}
	l := grantLine(t, e, "bob", k)
	if l["previous_user"] != "alice" || l["result"] != "taken_over" || l["level"] != "info" {
		t.Errorf("audit line of the takeover: %v", l)
	}
}

// An expired session passes nothing: another user's grant takes its key.
func TestExpiredSessionGoesToTheNewUser(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	k := state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.TCP}
	// Idle for two minutes, past the default of one.
	long := state.Now() - uint64(2*time.Minute)
	if err := e.maps().Grant(state.Session{Key: k, User: "alice", LastSeen: long, Created: long}); err != nil {
		t.Fatal(err)
	}
	resp, err := agent.LoginEvent(ctx(t), login("bob", client4, svcA4, 22, 0))
	if err != nil {
		t.Fatalf("bob's grant of alice's expired session: %v", err)
	}
	if !resp.GetCreated() {
		t.Errorf("response %v: want created", resp)
	}
	if s := e.dump()[k]; s.User != "bob" || s.Created <= long {
		t.Fatalf("session %+v", s)
	}
	if l := grantLine(t, e, "bob", k); l["previous_user"] != "alice" || l["result"] != "created" {
		t.Errorf("audit line: %v", l)
	}
}

// The check of who holds a key and the write are one step. Two grants of
// a free key cannot both create it (the kernel's insert fails if the key
// exists), but two grants of the key of an expired session both find it
// free: bob's, arriving while alice's is between its check and its write,
// must wait and then find her live session. Without the key's lock bob's
// grant would pass its check and both would "succeed", the later write
// silently winning.
func TestTakeoverCheckIsAtomic(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	k := state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.TCP}
	long := state.Now() - uint64(2*time.Minute)
	if err := e.maps().Grant(state.Session{Key: k, User: "carol", LastSeen: long, Created: long}); err != nil {
		t.Fatal(err)
	}
	claimed, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	controlplane.SetAfterClaim(e.srv, func() {
		once.Do(func() {
			close(claimed)
			<-release
		})
	})
	c := ctx(t)
	alice := make(chan error, 1)
	go func() {
		_, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0))
		alice <- err
	}()
	<-claimed
	bob := make(chan error, 1)
	go func() {
		_, err := agent.LoginEvent(c, login("bob", client4, svcA4, 22, 0))
		bob <- err
	}()
	// Bob's grant has time to reach the lock (or, without it, to finish).
	time.Sleep(200 * time.Millisecond)
	close(release)
	if err := <-alice; err != nil {
		t.Fatalf("alice's grant: %v", err)
	}
	if err := <-bob; code(err) != codes.AlreadyExists {
		t.Fatalf("bob's concurrent grant: %v, want AlreadyExists", err)
	}
	if s := e.dump()[k]; s.User != "alice" {
		t.Fatalf("session of %q, want alice's", s.User)
	}
}
