package controlplane_test

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// hostileUsers would forge a row of "aegisctl sessions", clear or recolour
// the operator's terminal, or reorder or hide what it shows. (Invalid
// UTF-8 does not get past the client's encoder: see decode_test.go.)
var hostileUsers = map[string]string{
	"newline":           "bob\nalice  tcp  192.0.2.99",
	"carriage return":   "bob\ralice",
	"escape sequence":   "\x1b[2J\x1b[Hok",
	"C1 CSI":            "bob\u009b2J",
	"RLO":               "bob\u202eecila",
	"LRI":               "bob\u2066x\u2069",
	"zero-width space":  "ali\u200bce",
	"byte order mark":   "\ufeffalice",
	"line separator":    "bob\u2028alice",
	"tab":               "bob\talice",
	"trailing space":    "alice ",
	"delete":            "bob\x7f",
	"zero-width joiner": "a\u200db",
}

// Every API that takes a user refuses a name that is not printable text,
// with InvalidArgument, changing nothing, and the audit line carries it
// escaped.
func TestHostileUserNamesAreRefused(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	c := ctx(t)
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	stream, err := agent.StreamLoginEvents(c)
	if err != nil {
		t.Fatal(err)
	}
	for name, user := range hostileUsers {
		if _, err := agent.LoginEvent(c, login(user, client4, svcB4, 443, 0)); code(err) != codes.InvalidArgument {
			t.Errorf("LoginEvent, %s: %v, want InvalidArgument", name, err)
		}
		// Onto alice's own session too: a refresh must not rename it.
		if _, err := agent.LoginEvent(c, login(user, client4, svcA4, 22, 0)); code(err) != codes.InvalidArgument {
			t.Errorf("LoginEvent over alice's session, %s: %v, want InvalidArgument", name, err)
		}
		if err := stream.Send(login(user, client4, svcB4, 443, 0)); err != nil {
			t.Fatal(err)
		}
		for what, req := range map[string]*agentv1.LogoutEventRequest{
			"by user": {User: user},
			"by key":  {User: user, SrcIp: client4.String(), DstIp: svcA4.String(), DstPort: 22},
		} {
			if _, err := agent.LogoutEvent(c, req); code(err) != codes.InvalidArgument {
				t.Errorf("LogoutEvent %s, %s: %v, want InvalidArgument", what, name, err)
			}
		}
		if _, err := agent.ListSessions(c, &agentv1.ListSessionsRequest{User: user}); code(err) != codes.InvalidArgument {
			t.Errorf("ListSessions, %s: %v, want InvalidArgument", name, err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil || resp.GetApplied() != 0 || resp.GetRejected() != uint64(len(hostileUsers)) {
		t.Fatalf("stream of hostile names: %v %v", resp, err)
	}
	for _, r := range resp.GetRejections() {
		if codes.Code(r.GetCode()) != codes.InvalidArgument {
			t.Errorf("stream rejection %v, want InvalidArgument", r)
		}
	}
	e.sameSessions("after the hostile names", before)

	// No raw control or format character reaches the log: the encoder
	// escapes C0 controls, the audit code the rest.
	log := e.logs.String()
	for _, bad := range []string{"\u009b", "\u202e", "\u2066", "\u200b", "\ufeff", "\u200d", "\x7f"} {
		if strings.Contains(log, bad) {
			t.Errorf("the log holds %q raw", bad)
		}
	}
	found := false
	for _, l := range e.logs.JSONLines(t, "grant") {
		if l["user"] == `"bob\u202eecila"` && l["result"] == "invalid" && l["peer"] == "controller" {
			found = true
		}
	}
	if !found {
		t.Errorf("no audit line of the refused RLO name, escaped:\n%s", log)
	}
}

// The compat API's user is the client certificate's name: one that is not
// a valid user grants nothing, and is escaped in the log. Revoking is
// still allowed, as it records no user.
func TestCompatHostileCertificateName(t *testing.T) {
	e := newEnv(t, envOptions{})
	conn := e.dial(e.client("ctl\x1b[2J\u202e"))
	compat := session.NewSessionManagerClient(conn)
	c := ctx(t)
	_, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: true})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "client certificate name") {
		t.Fatalf("grant by a client with a hostile name: %v, want InvalidArgument naming the certificate", err)
	}
	if n := len(e.dump()); n != 0 {
		t.Fatalf("%d sessions after the refused grant", n)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22}); err != nil {
		t.Fatalf("revoke by a client with a hostile name: %v", err)
	}
	if strings.Contains(e.logs.String(), "\u202e") {
		t.Error("the log holds the certificate name's RLO raw")
	}
	found := false
	for _, l := range e.logs.JSONLines(t, "grant") {
		found = found || (l["peer"] == `"ctl\x1b[2J\u202e"` && l["result"] == "invalid")
	}
	if !found {
		t.Errorf("no audit line naming the peer escaped:\n%s", e.logs.String())
	}

	// A long name is cut at 31 bytes, never inside a character, and
	// trimmed of the space the cut may leave at its end.
	for port, tc := range map[uint32]struct{ name, user string }{
		80: {"controller" + strings.Repeat("é", 11), "controller" + strings.Repeat("é", 10)},
		81: {strings.Repeat("a", 30) + " b", strings.Repeat("a", 30)},
	} {
		if _, err := session.NewSessionManagerClient(e.dial(e.client(tc.name))).SubmitSession(c,
			&session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: port, Activate: true}); err != nil {
			t.Fatal(err)
		}
		for _, s := range e.dump() {
			if uint32(s.Port) == port && s.User != tc.user {
				t.Errorf("certificate %q: user %q, want %q", tc.name, s.User, tc.user)
			}
		}
	}
}
