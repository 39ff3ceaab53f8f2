package controlplane_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/codes"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// handshake runs one client TLS handshake against the server and reads
// until the server has decided (under TLS 1.3 the client's Handshake
// returns before the server has checked the client's certificate).
func handshake(t *testing.T, e *env, cfg *tls.Config) {
	t.Helper()
	conn, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		return // refused during the client's part of the handshake
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = conn.Read(make([]byte, 1))
}

// waitFailures waits until the failures of reason reach want.
func waitFailures(t *testing.T, e *env, reason string, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := value(t, gather(t, e), "aegis_controlplane_tls_handshake_failures_total", "reason="+reason)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tls handshake failures{reason=%s} = %v, want %v\n%s", reason, got, want, e.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// expiredClient is a client certificate of the env's CA that expired an
// hour ago.
func expiredClient(t *testing.T, ca *pki.CA) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "controller"},
		NotBefore:    time.Now().Add(-2 * time.Hour),
		NotAfter:     time.Now().Add(-time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// Each way a client's TLS can be wrong is counted under its reason and
// logged with the peer's address; before the handshake observer, none of
// them left a trace on the server.
func TestTLSHandshakeFailures(t *testing.T) {
	e := newEnv(t, envOptions{allowed: []string{"controller"}})
	base := func(certs ...tls.Certificate) *tls.Config {
		return &tls.Config{ServerName: pki.ServerName, RootCAs: e.ca.CertPool(), Certificates: certs}
	}
	otherCA, err := pki.NewCA("another CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	serverPair, err := e.ca.IssueServer(pki.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	serverCert, err := serverPair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		reason string
		try    func()
	}{
		// Go's client sends no certificate when none is from a CA the
		// server names: the controller's certificate of another CA is
		// seen as no_certificate. Other clients (openssl, grpcurl with
		// some stacks) send it anyway.
		{"no_certificate", func() { handshake(t, e, base(clientCert(t, otherCA, "controller"))) }},
		{"unknown_ca", func() {
			cert := clientCert(t, otherCA, "controller")
			cfg := base()
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
			handshake(t, e, cfg)
		}},
		{"no_certificate", func() { handshake(t, e, base()) }},
		{"expired", func() { handshake(t, e, base(expiredClient(t, e.ca))) }},
		// A server certificate of the right CA is no client certificate.
		{"bad_certificate", func() { handshake(t, e, base(serverCert)) }},
		// The client refuses the server (it trusts another CA): Go's
		// client alerts bad_certificate whatever the cause.
		{"bad_certificate", func() {
			handshake(t, e, &tls.Config{ServerName: pki.ServerName, RootCAs: otherCA.CertPool(), Certificates: []tls.Certificate{e.client("controller")}})
		}},
		{"not_tls", func() {
			c, err := net.Dial("tcp", e.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, _ = c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
			_, _ = c.Read(make([]byte, 1))
		}},
	}
	want := map[string]float64{}
	for _, c := range cases {
		// Under the log's rate limit (5 lines a second), so that every
		// case's line is written.
		time.Sleep(250 * time.Millisecond)
		c.try()
		want[c.reason]++
		waitFailures(t, e, c.reason, want[c.reason])
	}

	// A name outside --allowed-client-name: the handshake completes, the
	// call is refused, and the connection is counted once.
	agent := agentv1.NewAgentServiceClient(e.dial(e.client("intruder")))
	for range 3 {
		if _, err := agent.LoginEvent(ctx(t), login("alice", client4, svcA4, 22, 0)); code(err) != codes.PermissionDenied {
			t.Fatalf("LoginEvent as intruder: %v", err)
		}
	}
	waitFailures(t, e, "name_not_allowed", 1)

	// The allowed controller is no failure.
	okClient := agentv1.NewAgentServiceClient(e.dial(e.client("controller")))
	if _, err := okClient.LoginEvent(ctx(t), login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	ms := gather(t, e)
	for _, r := range []string{"unknown_ca", "bad_certificate", "expired", "no_certificate", "not_tls", "name_not_allowed", "timeout", "other"} {
		if got := value(t, ms, "aegis_controlplane_tls_handshake_failures_total", "reason="+r); got != want[r]+map[string]float64{"name_not_allowed": 1}[r] {
			t.Errorf("reason %s: %v", r, got)
		}
	}

	logs := e.logs.String()
	for _, r := range []string{"unknown_ca", "no_certificate", "expired", "bad_certificate", "not_tls", "name_not_allowed"} {
		line := ""
		for _, l := range strings.Split(logs, "\n") {
			if strings.Contains(l, `"message":"TLS handshake refused"`) && strings.Contains(l, `"reason":"`+r+`"`) {
				line = l
				break
			}
		}
		if line == "" {
			t.Errorf("no log line for %s", r)
			continue
		}
		if !strings.Contains(line, `"level":"warn"`) || !strings.Contains(line, `"peer_addr":"127.0.0.1:`) || strings.Contains(line, `..."`) {
			t.Errorf("log line for %s: %s", r, line)
		}
	}
}

// The error mapping for what a live test cannot cheaply produce.
func TestHandshakeReason(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}, "timeout"},
		{fmt.Errorf("tls: %w", os.ErrDeadlineExceeded), "timeout"},
		{errors.New("EOF"), "other"},
		{&tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, "unknown_ca"},
		{&tls.CertificateVerificationError{Err: x509.CertificateInvalidError{Reason: x509.Expired}}, "expired"},
		{&tls.CertificateVerificationError{Err: x509.CertificateInvalidError{Reason: x509.NotAuthorizedToSign}}, "bad_certificate"},
		{tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}, "not_tls"},
		{errors.New("tls: client didn't provide a certificate"), "no_certificate"},
		{&net.OpError{Op: "remote error", Err: errors.New("tls: bad certificate")}, "bad_certificate"},
	} {
		if got := controlplane.HandshakeReason(c.err); got != c.want {
			t.Errorf("%v: %s, want %s", c.err, got, c.want)
		}
	}
}

// A scanner cannot flood the journal: at most n lines a period, and the
// next line written says how many were left out.
func TestLimitedLog(t *testing.T) {
	var buf tu.Buffer
	now := time.Unix(1000, 0)
	l := controlplane.NewLimitedLog(zerolog.New(&buf), 3, time.Second, func() time.Time { return now })
	for i := range 10 {
		l.Warn(func(ev *zerolog.Event) { ev.Int("i", i).Msg("refused") })
	}
	if n := strings.Count(buf.String(), "\n"); n != 3 {
		t.Fatalf("%d lines in one period, want 3:\n%s", n, buf.String())
	}
	now = now.Add(time.Second)
	l.Warn(func(ev *zerolog.Event) { ev.Msg("refused") })
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if last := lines[len(lines)-1]; !strings.Contains(last, `"suppressed":7`) {
		t.Fatalf("the next period's first line: %s", last)
	}
}
