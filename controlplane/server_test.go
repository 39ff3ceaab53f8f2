package controlplane_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

func TestReflectionListsTheServices(t *testing.T) {
	e := newEnv(t, envOptions{})
	stream, err := rpb.NewServerReflectionClient(e.dial(e.client("controller"))).ServerReflectionInfo(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&rpb.ServerReflectionRequest{MessageRequest: &rpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{"session.SessionManager", "aegis.agent.v1.AgentService", "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %v, missing %s", names, want)
		}
	}
}

func gather(t *testing.T, e *env) map[string][]*dto.Metric {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string][]*dto.Metric)
	for _, mf := range mfs {
		out[mf.GetName()] = mf.GetMetric()
	}
	return out
}

// value returns the value of the series of name whose labels include
// labels ("k=v" pairs).
func value(t *testing.T, ms map[string][]*dto.Metric, name string, labels ...string) float64 {
	t.Helper()
	for _, m := range ms[name] {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		match := true
		for _, kv := range labels {
			k, v, _ := strings.Cut(kv, "=")
			match = match && have[k] == v
		}
		if !match {
			continue
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, envOptions{capacity: 100})
	agent, compat := e.controller()
	c := ctx(t)
	for port := uint32(1); port <= 3; port++ {
		if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, port, 0)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := agent.LoginEvent(c, login("alice", client6, svcA6, 1, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 1, 0)); err != nil { // refresh
		t.Fatal(err)
	}
	if _, err := agent.LoginEvent(c, login("", client4, svcA4, 1, 0)); code(err) != codes.InvalidArgument {
		t.Fatal(err)
	}
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(other4), DstIp: ip4(svcA4), DstPort: 9, Activate: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LogoutEvent(c, &agentv1.LogoutEventRequest{SrcIp: client4.String(), DstIp: svcA4.String(), DstPort: 3}); err != nil {
		t.Fatal(err)
	}

	ms := gather(t, e)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"aegis_controlplane_grants_total", []string{"api=agent", "result=created"}, 4},
		{"aegis_controlplane_grants_total", []string{"api=agent", "result=refreshed"}, 1},
		{"aegis_controlplane_grants_total", []string{"api=agent", "result=invalid"}, 1},
		{"aegis_controlplane_grants_total", []string{"api=compat", "result=created"}, 1}, // one any-protocol session
		{"aegis_controlplane_grants_total", []string{"api=compat", "result=full"}, 0},
		{"aegis_controlplane_revokes_total", []string{"api=agent", "result=revoked"}, 1},
		{"aegis_controlplane_datapath_loaded", nil, 1},
		{"aegis_controlplane_datapath_filtered", nil, 1},
		{"aegis_grpc_server_handled_total", []string{"grpc_service=aegis.agent.v1.AgentService", "grpc_method=LoginEvent", "grpc_code=OK"}, 5},
		{"aegis_grpc_server_handled_total", []string{"grpc_service=aegis.agent.v1.AgentService", "grpc_method=LoginEvent", "grpc_code=InvalidArgument"}, 1},
		{"aegis_build_info", []string{"version=" + cli.Version(), "program_tag=" + daemon.ProgramTag()}, 1},
	} {
		if got := value(t, ms, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// The data path's series are the reaper's alone (reaper/exporter.go).
	for name := range ms {
		if strings.HasPrefix(name, "aegis_datapath_") || strings.HasPrefix(name, "aegis_xdp_") || strings.HasPrefix(name, "aegis_sessions_") {
			t.Errorf("the control plane exports %s, a series of the reaper's", name)
		}
	}
	if len(ms["aegis_grpc_server_handling_seconds"]) == 0 {
		t.Error("no gRPC handling-time histogram")
	}
	if got := value(t, ms, "aegis_controlplane_certificate_expiry_timestamp_seconds", "certificate=server"); got != float64(e.certs.NotAfter().Unix()) || got < float64(time.Now().Unix()) {
		t.Errorf("server certificate expiry %v", got)
	}
	if got := value(t, ms, "aegis_controlplane_certificate_expiry_timestamp_seconds", "certificate=client_ca"); got != float64(e.ca.Cert.NotAfter.Unix()) {
		t.Errorf("client CA expiry %v", got)
	}
	// Every name carries the prefix; no label value is an address or a
	// user name.
	for name, series := range ms {
		if !strings.HasPrefix(name, "aegis_") {
			t.Errorf("metric %s lacks the aegis_ prefix", name)
		}
		for _, m := range series {
			for _, l := range m.GetLabel() {
				v := l.GetValue()
				if strings.Contains(v, "192.0.2") || strings.Contains(v, "2001:db8") || strings.Contains(v, "198.51.100") ||
					v == "alice" {
					t.Errorf("%s has label %s=%q", name, l.GetName(), v)
				}
			}
		}
	}
}

func TestCertificatesReload(t *testing.T) {
	e := newEnv(t, envOptions{})
	newCA, err := pki.NewCA("rotated CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rotated, err := newCA.IssueServer(pki.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	call := func(cfg *tls.Config) error {
		_, err := agentv1.NewAgentServiceClient(e.dialWith(cfg)).GetStats(ctx(t), &agentv1.GetStatsRequest{})
		return err
	}
	oldClient := &tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool(), Certificates: []tls.Certificate{e.client("controller")}}
	newClient := &tls.Config{ServerName: pki.ServerName, RootCAs: newCA.CertPool(), Certificates: []tls.Certificate{clientCert(t, newCA, "controller")}}
	if err := call(oldClient); err != nil {
		t.Fatal(err)
	}

	// Rotate the server certificate and the client CA.
	if err := rotated.WriteFiles(e.file("server.crt"), e.file("server.key")); err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFile(e.file("ca.crt"), newCA.CertPEM); err != nil {
		t.Fatal(err)
	}
	if err := e.certs.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := call(newClient); err != nil {
		t.Fatalf("new connection after the rotation: %v", err)
	}
	if err := call(oldClient); code(err) != codes.Unavailable {
		t.Fatalf("client of the old CA after the rotation: %v", err)
	}

	// Broken files are refused and the rotated ones stay in use.
	for name, broken := range map[string]func() error{
		"garbage key": func() error { return os.WriteFile(e.file("server.key"), []byte("garbage"), 0o600) },
		"other key": func() error {
			other, _ := newCA.IssueServer(pki.ServerOptions{})
			return pki.WriteFile(e.file("server.key"), other.KeyPEM)
		},
		"empty CA": func() error { return os.WriteFile(e.file("ca.crt"), nil, 0o600) },
		"expired": func() error {
			expired, err := newCA.IssueServer(pki.ServerOptions{Lifetime: time.Nanosecond})
			if err != nil {
				return err
			}
			return expired.WriteFiles(e.file("server.crt"), e.file("server.key"))
		},
	} {
		if err := broken(); err != nil {
			t.Fatal(err)
		}
		if err := e.certs.Reload(); !errors.Is(err, controlplane.ErrTLS) {
			t.Errorf("reload of %s: %v, want ErrTLS", name, err)
		}
		if err := call(newClient); err != nil {
			t.Errorf("after a failed reload (%s): %v", name, err)
		}
		// Restore.
		if err := rotated.WriteFiles(e.file("server.crt"), e.file("server.key")); err != nil {
			t.Fatal(err)
		}
		if err := pki.WriteFile(e.file("ca.crt"), newCA.CertPEM); err != nil {
			t.Fatal(err)
		}
	}
	ms := gather(t, e)
	if got := value(t, ms, "aegis_controlplane_tls_reloads_total", "result=failure"); got != 4 {
		t.Errorf("failed reloads counted %v, want 4", got)
	}
}

// runMain runs the real command line in-process.
func runMain(ctx context.Context, args ...string) (int, string) {
	// Written from the server's goroutines, like a process's stderr.
	var out tu.Buffer
	code := controlplane.Main(ctx, args, cli.IO{Stdout: &out, Stderr: &out})
	return code, out.String()
}

func TestCommandLineRefusals(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--insecure", "--listen-address", "192.0.2.1"}, 2, "loopback"},
		{[]string{"--insecure"}, 2, "--insecure on all addresses refused"},
		{[]string{"--insecure", "--listen-address", "::"}, 2, "loopback"},
		{[]string{"--listen-address", "127.0.0.1"}, 2, "--tls-cert, --tls-key, --tls-client-ca"},
		{[]string{"--tls-cert", "a", "--tls-key", "b"}, 2, "--tls-client-ca"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--tls-cert", "a"}, 2, "exclude"},
		{[]string{"--listen-address", "gateway.example"}, 2, "not an IP address"},
		{[]string{"--listen-address", "gateway.example:50001"}, 2, "not an IP address"},
		{[]string{"--listen-address", "127.0.0.1:0"}, 2, "want 1-65535"},
		{[]string{"--insecure", "--listen-address", "192.0.2.1:50001"}, 2, "loopback"},
		{[]string{"--insecure", "--listen-address", ":50001"}, 2, "--insecure on all addresses refused"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--monitor-interval", "0s"}, 2, "--monitor-interval"},
		{[]string{"--tls-cert", dir + "/missing.crt", "--tls-key", dir + "/missing.key", "--tls-client-ca", dir + "/ca.crt"}, 1, "missing.crt"},
		{[]string{"--grpc-port", "70000"}, 2, "grpc-port"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store", "redis:x"}, 2, "--store"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store", "file:"}, 2, "file:PATH"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store", "etcd:http://127.0.0.1:2379"}, 2, "--store-plaintext"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store", "etcd:http://192.0.2.1:2379", "--store-plaintext"}, 2, "loopback"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store", "etcd:https://192.0.2.1:2379"}, 2, "--store-ca"},
		{[]string{"--insecure", "--listen-address", "127.0.0.1", "--store-ack-timeout", "0s"}, 2, "--store-ack-timeout"},
	} {
		code, out := runMain(context.Background(), append(tc.args, "--pin-path", dir)...)
		if code != tc.code || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, output %q; want exit %d mentioning %q", tc.args, code, out, tc.code, tc.want)
		}
		if strings.Count(strings.TrimSpace(out), "\n") > 0 && tc.code == 2 {
			t.Errorf("%v: want one line, got %q", tc.args, out)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// The real command line serves plaintext on loopback with --insecure, and
// exits 0 when its context ends. The listen address takes HOST:PORT, as
// the metrics flags do (a bare IP with -g is the e2e tests' form).
func TestCommandLineInsecureLoopback(t *testing.T) {
	e := newEnv(t, envOptions{}) // for the pins
	port := freePort(t)
	c, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var out string
	go func() {
		var code int
		code, out = runMain(c, "--insecure", "--listen-address", fmt.Sprintf("127.0.0.1:%d", port), "-g", "1",
			"--pin-path", e.pin, "--log-format", "json")
		done <- code
	}()
	conn := e.dialInsecure(fmt.Sprintf("127.0.0.1:%d", port))
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err = session.NewSessionManagerClient(conn).SubmitSession(ctx(t),
			&session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 22, Activate: true}); code(err) != codes.Unavailable {
			break
		}
	}
	if err != nil {
		t.Fatalf("plaintext SubmitSession: %v", err)
	}
	for _, s := range e.dump() {
		if s.User != controlplane.CompatUserInsecure {
			t.Fatalf("compat user without TLS: %q", s.User)
		}
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d: %s", code, out)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Main did not return after its context ended")
	}
}
