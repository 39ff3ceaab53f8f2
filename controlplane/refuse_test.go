package controlplane_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// tryAll calls a grant of each API and a revoke on conn, and returns their
// errors.
func tryAll(t *testing.T, conn *grpc.ClientConn) []error {
	c := ctx(t)
	agent, compat := agentv1.NewAgentServiceClient(conn), session.NewSessionManagerClient(conn)
	_, e1 := agent.LoginEvent(c, login("mallory", client4, svcB4, 22, 0))
	_, e2 := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcB4), DstPort: 23, Activate: true})
	_, e3 := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{User: "alice"})
	_, e4 := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: false})
	return []error{e1, e2, e3, e4}
}

func TestUnauthorizedClientsChangeNothing(t *testing.T) {
	e := newEnv(t, envOptions{allowed: []string{"controller", "ops.example.net"}})
	agent, _ := e.controller()
	if _, err := agent.LoginEvent(ctx(t), login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	otherCA, err := pki.NewCA("someone else's CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		cfg   *tls.Config
		codes []codes.Code
	}{
		// The TLS layer refuses these: the client sees the connection fail.
		{"certificate of another CA", &tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool(),
			Certificates: []tls.Certificate{clientCert(t, otherCA, "controller")}}, []codes.Code{codes.Unavailable}},
		{"no client certificate", &tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool()}, []codes.Code{codes.Unavailable}},
		// The allowlist refuses this one, by name.
		{"name not allowed", &tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool(),
			Certificates: []tls.Certificate{e.client("intruder")}}, []codes.Code{codes.PermissionDenied}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i, err := range tryAll(t, e.dialWith(tc.cfg)) {
				if code(err) != tc.codes[0] {
					t.Errorf("call %d: %v, want %v", i, err, tc.codes[0])
				}
			}
			e.sameSessions("after the refused calls", before)
		})
	}
	if !strings.Contains(e.logs.String(), `"peer":"intruder"`) {
		t.Error("the refusal of intruder is not logged with its name")
	}

	// Allowed by DNS SAN, case-insensitively; and the server presents
	// aegis-agent.
	conn := e.dial(e.client("OPS.example.net"))
	if _, err := agentv1.NewAgentServiceClient(conn).LoginEvent(ctx(t), login("bob", client4, svcA4, 23, 0)); err != nil {
		t.Fatalf("allowed client: %v", err)
	}
	// A client that does not trust the server's CA refuses it.
	bad := e.dialWith(&tls.Config{ServerName: pki.ServerName, RootCAs: otherCA.CertPool(), Certificates: []tls.Certificate{e.client("controller")}})
	if _, err := agentv1.NewAgentServiceClient(bad).GetStats(ctx(t), &agentv1.GetStatsRequest{}); code(err) != codes.Unavailable {
		t.Fatalf("client not trusting the server: %v", err)
	}
}

func TestMalformedRequestsChangeNothing(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, compat := e.controller()
	c := ctx(t)
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(other4), DstIp: ip4(svcA4), DstPort: 80, Activate: true}); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	ok := func() *agentv1.LoginEventRequest {
		return login("mallory", client4, svcB4, 443, agentv1.Protocol_PROTOCOL_TCP)
	}
	with := func(f func(*agentv1.LoginEventRequest)) *agentv1.LoginEventRequest { r := ok(); f(r); return r }
	logins := map[string]*agentv1.LoginEventRequest{
		"empty user":         with(func(r *agentv1.LoginEventRequest) { r.User = "" }),
		"user of 32 bytes":   with(func(r *agentv1.LoginEventRequest) { r.User = strings.Repeat("u", 32) }),
		"NUL in user":        with(func(r *agentv1.LoginEventRequest) { r.User = "a\x00b" }),
		"bad source":         with(func(r *agentv1.LoginEventRequest) { r.SrcIp = "192.0.2.300" }),
		"empty source":       with(func(r *agentv1.LoginEventRequest) { r.SrcIp = "" }),
		"host name":          with(func(r *agentv1.LoginEventRequest) { r.DstIp = "service.example" }),
		"CIDR":               with(func(r *agentv1.LoginEventRequest) { r.DstIp = "198.51.100.0/24" }),
		"mixed families":     with(func(r *agentv1.LoginEventRequest) { r.DstIp = "2001:db8:2::10" }),
		"IPv4-mapped":        with(func(r *agentv1.LoginEventRequest) { r.SrcIp = "::ffff:192.0.2.10" }),
		"zone":               with(func(r *agentv1.LoginEventRequest) { r.SrcIp, r.DstIp = "fe80::1%eth0", "2001:db8:2::10" }),
		"unspecified source": with(func(r *agentv1.LoginEventRequest) { r.SrcIp = "0.0.0.0" }),
		"unspecified IPv6":   with(func(r *agentv1.LoginEventRequest) { r.SrcIp, r.DstIp = "2001:db8:1::10", "::" }),
		"port 0":             with(func(r *agentv1.LoginEventRequest) { r.DstPort = 0 }),
		"port 65536":         with(func(r *agentv1.LoginEventRequest) { r.DstPort = 65536 }),
		"unknown protocol":   with(func(r *agentv1.LoginEventRequest) { r.Protocol = 7 }),
		"negative idle":      with(func(r *agentv1.LoginEventRequest) { r.IdleTimeout = durationpb.New(-time.Second) }),
		"idle below 1s":      with(func(r *agentv1.LoginEventRequest) { r.IdleTimeout = durationpb.New(time.Millisecond) }),
		"invalid duration":   with(func(r *agentv1.LoginEventRequest) { r.IdleTimeout = &durationpb.Duration{Seconds: 1, Nanos: -5} }),
		"negative lifetime":  with(func(r *agentv1.LoginEventRequest) { r.MaxLifetime = durationpb.New(-time.Hour) }),
		"lifetime out of range": with(func(r *agentv1.LoginEventRequest) {
			r.MaxLifetime = &durationpb.Duration{Seconds: 400_000_000_000}
		}),
	}
	for name, req := range logins {
		if _, err := agent.LoginEvent(c, req); code(err) != codes.InvalidArgument {
			t.Errorf("LoginEvent, %s: %v, want InvalidArgument", name, err)
		}
	}
	compats := map[string]*session.LoginEvent{
		"source 0.0.0.0": {SrcIp: 0, DstIp: ip4(svcB4), DstPort: 80},
		"dest 0.0.0.0":   {SrcIp: ip4(client4), DstIp: 0, DstPort: 80},
		"port 0":         {SrcIp: ip4(client4), DstIp: ip4(svcB4), DstPort: 0},
		"port 65536":     {SrcIp: ip4(client4), DstIp: ip4(svcB4), DstPort: 65536},
		"port 2^32-1":    {SrcIp: ip4(client4), DstIp: ip4(svcB4), DstPort: 1<<32 - 1},
	}
	for name, ev := range compats {
		for _, activate := range []bool{true, false} {
			ev.Activate = activate
			if _, err := compat.SubmitSession(c, ev); code(err) != codes.InvalidArgument {
				t.Errorf("SubmitSession, %s, activate=%v: %v, want InvalidArgument", name, activate, err)
			}
		}
	}
	// The existing compat session is to 198.51.100.10: a bad change in the
	// same list as a good one changes nothing.
	changes := map[string][]*session.IpChangeEvent{
		"old 0.0.0.0":    {{OldIp: ip4(svcA4), NewIp: ip4(svcB4)}, {OldIp: 0, NewIp: ip4(svcB4)}},
		"new 0.0.0.0":    {{OldIp: ip4(svcA4), NewIp: 0}},
		"ambiguous move": {{OldIp: ip4(svcA4), NewIp: ip4(svcB4)}, {OldIp: ip4(svcA4), NewIp: ip4(client4)}},
	}
	for name, ch := range changes {
		if _, err := compat.IpChange(c, &session.IpChangeList{IpChanges: ch}); code(err) != codes.InvalidArgument {
			t.Errorf("IpChange, %s: %v, want InvalidArgument", name, err)
		}
	}
	logouts := map[string]*agentv1.LogoutEventRequest{
		"nothing":          {},
		"partial key":      {SrcIp: client4.String(), DstIp: svcA4.String()},
		"protocol only":    {User: "alice", Protocol: agentv1.Protocol_PROTOCOL_UDP},
		"bad address":      {SrcIp: "x", DstIp: svcA4.String(), DstPort: 22},
		"user of 32 bytes": {User: strings.Repeat("u", 32)},
		"port 65536":       {SrcIp: client4.String(), DstIp: svcA4.String(), DstPort: 65536},
	}
	for name, req := range logouts {
		if _, err := agent.LogoutEvent(c, req); code(err) != codes.InvalidArgument {
			t.Errorf("LogoutEvent, %s: %v, want InvalidArgument", name, err)
		}
	}
	for name, req := range map[string]*agentv1.ListSessionsRequest{
		"bad source": {SrcIp: "nope"}, "bad port": {DstPort: 70000},
	} {
		if _, err := agent.ListSessions(c, req); code(err) != codes.InvalidArgument {
			t.Errorf("ListSessions, %s: %v, want InvalidArgument", name, err)
		}
	}
	// Bulk: the malformed requests are rejected one by one, nothing applied.
	stream, err := agent.StreamLoginEvents(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range logins {
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil || resp.GetApplied() != 0 || resp.GetRejected() != uint64(len(logins)) {
		t.Fatalf("bulk of malformed requests: %v %v", resp, err)
	}
	e.sameSessions("after the malformed requests", before)
}

func TestFullMapKeepsExistingSessions(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 4})
	agent, _ := e.controller()
	c := ctx(t)
	for port := uint32(1); port <= 4; port++ {
		if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, port, 0)); err != nil {
			t.Fatal(err)
		}
	}
	before := e.dump()
	_, err := agent.LoginEvent(c, login("bob", client4, svcA4, 5, 0))
	if code(err) != codes.ResourceExhausted {
		t.Fatalf("grant into a full map: %v, want ResourceExhausted", err)
	}
	e.sameSessions("after the refused grant", before)
	// The bulk API rejects the ones that do not fit and applies the rest.
	stream, _ := agent.StreamLoginEvents(c)
	_ = stream.Send(login("bob", client4, svcA4, 6, 0))
	_ = stream.Send(login("alice", client4, svcA4, 1, 0)) // a refresh fits
	resp, err := stream.CloseAndRecv()
	if err != nil || resp.GetApplied() != 1 || resp.GetRejected() != 1 ||
		codes.Code(resp.GetRejections()[0].GetCode()) != codes.ResourceExhausted {
		t.Fatalf("bulk on a full map: %v %v", resp, err)
	}
	if n := len(e.dump()); n != 4 {
		t.Fatalf("%d sessions", n)
	}
}

func TestPinsMissing(t *testing.T) {
	e := newEnv(t, envOptions{noPins: true, refresh: 50 * time.Millisecond})
	agent, compat := e.controller()
	c := ctx(t)
	health := healthpb.NewHealthClient(e.dial(e.client("controller")))

	_, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0))
	if code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "aegis-loader load") {
		t.Fatalf("LoginEvent without pins: %v, want Unavailable naming aegis-loader load", err)
	}
	_, err = compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: true})
	if code(err) != codes.Unavailable {
		t.Fatalf("SubmitSession without pins: %v", err)
	}
	for _, call := range map[string]func() error{
		"ListSessions": func() error { _, err := agent.ListSessions(c, &agentv1.ListSessionsRequest{}); return err },
		"GetStats":     func() error { _, err := agent.GetStats(c, &agentv1.GetStatsRequest{}); return err },
		"IpChange": func() error {
			_, err := compat.IpChange(c, &session.IpChangeList{IpChanges: []*session.IpChangeEvent{{OldIp: 1, NewIp: 2}}})
			return err
		},
		"MonitorSessions": func() error {
			s, err := compat.MonitorSessions(c, &session.Empty{})
			if err == nil {
				_, err = s.Recv()
			}
			return err
		},
	} {
		if err := call(); code(err) != codes.Unavailable {
			t.Errorf("without pins: %v, want Unavailable", err)
		}
	}
	// The process is up, the session services are not, and neither is the
	// server as a whole: nothing enforces.
	checkHealth := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		r, err := health.Check(c, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetStatus()
	}
	if s := checkHealth(""); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("server health without pins %v", s)
	}
	if s := checkHealth("aegis.agent.v1.AgentService"); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("AgentService health without pins %v", s)
	}

	// The loader runs: within a refresh the grants work.
	tu.PinMaps(t, e.pin, tu.PinOptions{})
	deadline := time.Now().Add(2 * time.Second)
	for checkHealth("session.SessionManager") != healthpb.HealthCheckResponse_SERVING {
		if time.Now().After(deadline) {
			t.Fatal("SessionManager not SERVING 2 s after the pins appeared")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := checkHealth(""); s != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("server health with pins %v", s)
	}
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatalf("after the pins appeared: %v", err)
	}
}

func TestShutdownEndsStreams(t *testing.T) {
	e := newEnv(t, envOptions{interval: time.Hour})
	conn := e.dial(e.client("controller"))
	c := ctx(t)
	mon, err := session.NewSessionManagerClient(conn).MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mon.Recv(); err != nil {
		t.Fatal(err)
	}
	watch, err := healthpb.NewHealthClient(conn).Watch(c, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health watch: %v %v", r, err)
	}
	start := time.Now()
	e.stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("shutdown took %v with open streams", d)
	}
	if _, err := mon.Recv(); code(err) != codes.Unavailable {
		t.Fatalf("MonitorSessions after shutdown: %v, want Unavailable", err)
	}
	sawNotServing := false
	for {
		r, err := watch.Recv()
		if err != nil {
			break
		}
		sawNotServing = sawNotServing || r.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
	}
	if !sawNotServing {
		t.Fatal("health watchers were not told NOT_SERVING")
	}
}

// A bounded graceful stop: a client stream that never ends does not hold
// the process.
func TestShutdownIsBounded(t *testing.T) {
	e := newEnv(t, envOptions{})
	agent, _ := e.controller()
	stream, err := agent.StreamLoginEvents(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	// Wait until the grant landed, so the stream is in the handler.
	for deadline := time.Now().Add(2 * time.Second); len(e.dump()) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("streamed grant never applied")
		}
	}
	c, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	e.srv.Shutdown(c)
	e.stopped = true
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Fatalf("shutdown with a stuck stream took %v, want about the 200 ms bound", d)
	}
	if _, err := e.maps().Lookup(state.Key{Src: client4, Dst: svcA4, Port: 22, Proto: state.TCP}); err != nil {
		t.Fatalf("the streamed grant did not survive the shutdown: %v", err)
	}
}
