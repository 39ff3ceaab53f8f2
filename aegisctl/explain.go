package aegisctl

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrTransport marks a call that failed before the control plane saw it:
// unreachable, or a TLS handshake refused by either side. Its message names
// the cause and the fix.
var ErrTransport = errors.New("transport failure")

// ConnError is a call's failure explained: Cause is one of the Cause*
// values, Msg the operator's line.
type ConnError struct {
	Cause string
	Msg   string
	// Err is what gRPC reported. It is not unwrapped: the explanation
	// replaces gRPC's status, whose message is the transport's own.
	Err error
}

func (e *ConnError) Error() string { return e.Msg }

// Is makes errors.Is(err, ErrTransport) true for every cause.
func (e *ConnError) Is(target error) bool { return target == ErrTransport }

// Retryable tells whether the cause can go away by itself (a daemon
// restarting), as opposed to a configuration that must be fixed.
func (e *ConnError) Retryable() bool {
	switch e.Cause {
	case CauseUnreachable, CauseClosed:
		return true
	}
	return false
}

// The causes explain tells apart.
const (
	CauseUnreachable    = "unreachable"          // refused, no route, no answer, no such host
	CauseClosed         = "closed"               // the connection ended (a restart)
	CauseUnknownCA      = "unknown-ca"           // server certificate not from --tls-ca
	CauseNameMismatch   = "name-mismatch"        // server certificate lacks --server-name
	CauseServerExpired  = "server-expired"       // server certificate expired or not yet valid
	CauseClientRefused  = "client-cert-refused"  // the server's TLS refused the client certificate
	CauseNotAllowed     = "client-not-allowed"   // PermissionDenied: not in --allowed-client-name
	CauseNoClientCert   = "client-cert-required" // Unauthenticated
	CausePlainToTLS     = "plaintext-to-tls"     // --insecure against a TLS server
	CauseTLSToPlain     = "tls-to-plaintext"     // TLS against a --insecure server
	CauseOtherHandshake = "handshake"            // any other TLS failure
)

// explain turns a failed call into a ConnError when the failure is the
// transport's or the authorization's; errors of the call itself
// (InvalidArgument, NotFound, ...) pass unchanged.
func (c *Conn) explain(addr string, err error) error {
	if err == nil {
		return nil
	}
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.PermissionDenied:
		return &ConnError{Cause: CauseNotAllowed, Err: err, Msg: fmt.Sprintf(
			"the control plane at %s does not allow this client: %s: add the certificate's name to the gateway's --allowed-client-name (AEGIS_ALLOWED_CLIENT_NAME), or use an allowed certificate",
			addr, st.Message())}
	case codes.Unauthenticated:
		return &ConnError{Cause: CauseNoClientCert, Err: err, Msg: fmt.Sprintf(
			"the control plane at %s requires a client certificate: %s: give --tls-cert and --tls-key", addr, st.Message())}
	case codes.Unavailable, codes.DeadlineExceeded:
	default:
		return err
	}
	stage, terr := c.diag.get()
	if terr == nil {
		if st.Code() == codes.DeadlineExceeded && stage == stageConnected {
			what := "a TLS handshake"
			if c.Insecure {
				what = "an HTTP/2 greeting"
			}
			return &ConnError{Cause: CauseUnreachable, Err: err, Msg: fmt.Sprintf(
				"the control plane at %s accepted the connection but did not complete %s within %v: is that port the control plane's?", addr, what, c.Timeout)}
		}
		if st.Code() == codes.DeadlineExceeded {
			return &ConnError{Cause: CauseUnreachable, Err: err, Msg: fmt.Sprintf(
				"cannot reach the control plane at %s: no answer within %v: check the address, and that nothing drops the packets", addr, c.Timeout)}
		}
		if strings.Contains(st.Message(), "connection") || strings.Contains(st.Message(), "transport") {
			return &ConnError{Cause: CauseClosed, Err: err, Msg: fmt.Sprintf("lost the connection to the control plane at %s: %s", addr, st.Message())}
		}
		return err
	}
	ce := classify(c, addr, stage, terr)
	ce.Err = err
	return ce
}

// classify names the cause of a transport failure from its error chain.
func classify(c *Conn, addr, stage string, err error) *ConnError {
	mk := func(cause, format string, a ...any) *ConnError {
		return &ConnError{Cause: cause, Msg: fmt.Sprintf(format, a...)}
	}
	switch stage {
	case stageDial:
		var dnsErr *net.DNSError
		switch {
		case errors.As(err, &dnsErr):
			return mk(CauseUnreachable, "cannot reach the control plane at %s: no such host %q: check --address", addr, dnsErr.Name)
		case errors.Is(err, syscall.ECONNREFUSED):
			return mk(CauseUnreachable, "cannot reach the control plane at %s: connection refused: is aegis-controlplane running, and listening on that address and --grpc-port?", addr)
		case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
			return mk(CauseUnreachable, "cannot reach the control plane at %s: no route to the host: check --address and the network", addr)
		case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT), isTimeout(err):
			return mk(CauseUnreachable, "cannot reach the control plane at %s: no answer within %v: check --address, and that nothing drops the packets", addr, c.Timeout)
		}
		return mk(CauseUnreachable, "cannot reach the control plane at %s: %v", addr, err)
	case stageHandshake:
		return classifyTLS(c, addr, err)
	}
	// A read after the handshake: an alert from the server, or the
	// connection closed.
	if a, ok := remoteAlert(err); ok {
		return alertCause(c, addr, a)
	}
	if c.Insecure && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) && speaksTLS(addr, c.Timeout) {
		return mk(CausePlainToTLS, "the control plane at %s speaks TLS and --insecure is plaintext: drop --insecure and give --tls-cert, --tls-key and --tls-ca", addr)
	}
	// gRPC may have closed the connection on a failed write before its
	// reader saw the server's alert: ask again, on a connection of our own.
	if c.tlsCfg != nil {
		if a, ok := probeAlert(addr, c.tlsCfg, c.Timeout); ok {
			return alertCause(c, addr, a)
		}
	}
	return mk(CauseClosed, "lost the connection to the control plane at %s: %v", addr, err)
}

func classifyTLS(c *Conn, addr string, err error) *ConnError {
	mk := func(cause, format string, a ...any) *ConnError {
		return &ConnError{Cause: cause, Msg: fmt.Sprintf(format, a...)}
	}
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		record   tls.RecordHeaderError
	)
	switch {
	case errors.As(err, &unknown):
		issuer := "?"
		if unknown.Cert != nil {
			issuer = unknown.Cert.Issuer.CommonName
		}
		return mk(CauseUnknownCA, "TLS: the control plane at %s presented a certificate issued by %q, not by the CA in --tls-ca %s: give --tls-ca the CA that issued the gateway's server certificate", addr, issuer, c.TLSCA)
	case errors.As(err, &hostname):
		var names []string
		if hostname.Certificate != nil {
			names = append(names, hostname.Certificate.DNSNames...)
			for _, ip := range hostname.Certificate.IPAddresses {
				names = append(names, ip.String())
			}
		}
		return mk(CauseNameMismatch, "TLS: the control plane's certificate is not valid for --server-name %s (it names %s): pass one of those as --server-name, or reissue it with aegisctl certs server", hostname.Host, strings.Join(names, ", "))
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		cert := invalid.Cert
		if cert != nil && time.Now().Before(cert.NotBefore) {
			return mk(CauseServerExpired, "TLS: the control plane's certificate is valid only from %s: check this machine's clock and the gateway's", cert.NotBefore.UTC().Format(time.RFC3339))
		}
		when := "?"
		if cert != nil {
			when = cert.NotAfter.UTC().Format(time.RFC3339)
		}
		return mk(CauseServerExpired, "TLS: the control plane's certificate expired at %s: renew it on the gateway (aegisctl certs renew server) and restart aegis-controlplane", when)
	case errors.As(err, &record):
		return mk(CauseTLSToPlain, "the control plane at %s speaks plaintext, not TLS (it runs with --insecure): pass --insecure, or give the daemon its --tls-cert, --tls-key and --tls-client-ca", addr)
	}
	if a, ok := remoteAlert(err); ok {
		return alertCause(c, addr, a)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
		return mk(CauseClosed, "the control plane at %s closed the connection during the TLS handshake: %v", addr, err)
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return mk(CauseUnreachable, "the control plane at %s accepted the connection but did not complete a TLS handshake within %v: is that port the control plane's?", addr, c.Timeout)
	}
	return mk(CauseOtherHandshake, "TLS handshake with the control plane at %s failed: %v", addr, err)
}

// alertCause explains an alert the server sent about the client's
// certificate.
func alertCause(c *Conn, addr string, a tls.AlertError) *ConnError {
	var why string
	switch a {
	case alertCertificateRequired, alertHandshakeFailure:
		// aegisctl always has a certificate: TLS sends none when the
		// server asks for one from CAs that did not issue it.
		why = "it requires a client certificate: give --tls-cert and --tls-key"
		if issuer := certIssuer(c.tlsCfg); issuer != "" {
			why = fmt.Sprintf("it asks for a certificate of its --tls-client-ca, and %s is issued by %q, so none was sent: use a certificate from the gateway's CA (aegisctl certs client NAME there)", c.TLSCert, issuer)
		}
	case alertUnknownCA:
		why = fmt.Sprintf("%s is not issued by the CA it trusts (its --tls-client-ca): use a certificate from that CA (aegisctl certs client NAME on the gateway)", c.TLSCert)
	case alertCertificateExpired:
		why = fmt.Sprintf("%s has expired: renew it (aegisctl certs renew NAME on the gateway)", c.TLSCert)
	case alertBadCertificate, alertUnsupportedCertificate:
		why = fmt.Sprintf("%s is not a client certificate of its CA: use one made by aegisctl certs client NAME", c.TLSCert)
	default:
		why = fmt.Sprintf("it sent the alert %q", a.Error())
	}
	return &ConnError{Cause: CauseClientRefused, Msg: fmt.Sprintf("TLS: the control plane at %s refused the client certificate: %s", addr, why)}
}

// The TLS alerts (RFC 8446 section 6) a server sends about a client's
// certificate.
const (
	alertHandshakeFailure       tls.AlertError = 40
	alertBadCertificate         tls.AlertError = 42
	alertUnsupportedCertificate tls.AlertError = 43
	alertCertificateExpired     tls.AlertError = 45
	alertUnknownCA              tls.AlertError = 48
	alertCertificateRequired    tls.AlertError = 116
)

// remoteAlert finds an alert the peer sent. crypto/tls reports one as a
// *net.OpError "remote error" wrapping its unexported alert type, a uint8,
// or (in QUIC and some paths) as a tls.AlertError.
func remoteAlert(err error) (tls.AlertError, bool) {
	var ae tls.AlertError
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" && op.Err != nil {
		if v := reflect.ValueOf(op.Err); v.Kind() == reflect.Uint8 {
			return tls.AlertError(v.Uint()), true
		}
	}
	if errors.As(err, &ae) {
		return ae, true
	}
	return 0, false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// speaksTLS tells whether addr answers a TLS ClientHello with a
// ServerHello: the check behind "--insecure against a TLS server", whose
// only symptom on the plaintext connection is that it is closed. The
// probe verifies nothing and sends no data.
func speaksTLS(addr string, timeout time.Duration) bool {
	timeout = min(timeout, 3*time.Second)
	d := net.Dialer{Timeout: timeout}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return false
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}) //nolint:gosec // a probe of the protocol, no data
	err = conn.Handshake()
	if err == nil {
		return true
	}
	var record tls.RecordHeaderError
	_, alerted := remoteAlert(err)
	return alerted && !errors.As(err, &record)
}

// probeAlert makes a TLS connection to addr with cfg and reads until the
// server sends data, an alert, or the deadline: the alert of a server
// that refuses the client certificate once the handshake is done (TLS
// 1.3).
func probeAlert(addr string, cfg *tls.Config, timeout time.Duration) (tls.AlertError, bool) {
	timeout = min(timeout, 3*time.Second)
	d := net.Dialer{Timeout: timeout}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return 0, false
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(timeout))
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	conn := tls.Client(raw, cfg)
	if err := conn.Handshake(); err != nil {
		return remoteAlert(err)
	}
	// The client's HTTP/2 preface, so that a server that accepts the
	// certificate answers with its settings rather than waiting.
	if _, err := conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")); err != nil {
		if a, ok := remoteAlert(err); ok {
			return a, true
		}
	}
	var b [1]byte
	_, err = conn.Read(b[:])
	return remoteAlert(err)
}

// certIssuer is the issuer's name of the client certificate in cfg.
func certIssuer(cfg *tls.Config) string {
	if cfg == nil || len(cfg.Certificates) == 0 || len(cfg.Certificates[0].Certificate) == 0 {
		return ""
	}
	leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0])
	if err != nil {
		return ""
	}
	return leaf.Issuer.CommonName
}
