package controlplane

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"google.golang.org/grpc/credentials"

	"github.com/aegis-agent/aegis/internal/state"
)

// Handshake failure reasons: a closed set, so the metric's cardinality is
// fixed whatever a scanner sends.
const (
	tlsUnknownCA      = "unknown_ca"       // the client's certificate is not from the client CA (or the client does not trust ours)
	tlsBadCertificate = "bad_certificate"  // a certificate that does not parse or verify for another reason
	tlsExpired        = "expired"          // a certificate outside its validity period
	tlsNoCertificate  = "no_certificate"   // the client sent none
	tlsNotTLS         = "not_tls"          // the first bytes were not a TLS handshake (plaintext gRPC, HTTP, a scanner)
	tlsNameNotAllowed = "name_not_allowed" // handshake fine, but the name is outside --allowed-client-name
	tlsTimeout        = "timeout"          // no complete handshake within the connection timeout
	tlsOther          = "other"
)

var tlsReasons = []string{tlsUnknownCA, tlsBadCertificate, tlsExpired, tlsNoCertificate, tlsNotTLS,
	tlsNameNotAllowed, tlsTimeout, tlsOther}

// handshakeReason maps an error of crypto/tls's server handshake to a
// reason. Go types some of them (x509's, RecordHeaderError, net.Error);
// the client's missing certificate and the alerts a client sends back
// are plain errors whose text is all there is.
func handshakeReason(err error) string {
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var record tls.RecordHeaderError
	var verify *tls.CertificateVerificationError
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.As(err, &unknown):
		return tlsUnknownCA
	case errors.As(err, &invalid):
		if invalid.Reason == x509.Expired {
			return tlsExpired
		}
		return tlsBadCertificate
	case errors.As(err, &record):
		return tlsNotTLS
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return tlsTimeout
	case strings.Contains(msg, "client didn't provide a certificate"):
		return tlsNoCertificate
	// Alerts from the client: it refused the server's certificate.
	case strings.Contains(msg, "unknown certificate authority"):
		return tlsUnknownCA
	case strings.Contains(msg, "certificate expired"):
		return tlsExpired
	// Any other certificate trouble: a verification error of another
	// kind, the client's "bad certificate" alert, a certificate that
	// does not parse or signs with the wrong algorithm.
	case errors.As(err, &verify), strings.Contains(msg, "certificate"):
		return tlsBadCertificate
	}
	return tlsOther
}

// handshakeObserver wraps the listener's TLS credentials: every failed
// handshake is counted by reason and logged (rate-limited) with the
// peer's address. grpc-go drops these errors, so without it a controller
// holding a certificate of another CA leaves no trace on the agent.
type handshakeObserver struct {
	credentials.TransportCredentials
	failures *prometheus.CounterVec
	counters map[string]prometheus.Counter
	allowed  func(*x509.Certificate) bool
	log      *limitedLog
}

func newTLSFailures() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "aegis_controlplane_tls_handshake_failures_total",
		Help: "Client connections refused during or right after the TLS handshake, by reason (" + strings.Join(tlsReasons, ", ") + ").",
	}, []string{"reason"})
}

func newHandshakeObserver(creds credentials.TransportCredentials, failures *prometheus.CounterVec,
	allowed func(*x509.Certificate) bool, log zerolog.Logger) *handshakeObserver {
	o := &handshakeObserver{TransportCredentials: creds, failures: failures, counters: make(map[string]prometheus.Counter),
		allowed: allowed, log: newLimitedLog(log, handshakeLogsPerSecond, time.Second)}
	for _, r := range tlsReasons {
		o.counters[r] = failures.WithLabelValues(r)
	}
	return o
}

// handshakeLogsPerSecond bounds the warn lines of failed handshakes: a
// scanner opening thousands of connections a second costs the journal
// this many lines a second and one count of the rest.
const handshakeLogsPerSecond = 5

func (o *handshakeObserver) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := o.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		o.fail(raw.RemoteAddr(), handshakeReason(err), "", err)
		return nil, nil, err
	}
	if o.allowed != nil {
		if ti, ok := info.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 && len(ti.State.VerifiedChains[0]) > 0 {
			if leaf := ti.State.VerifiedChains[0][0]; !o.allowed(leaf) {
				// The connection stays: its calls are refused with
				// PermissionDenied, which tells the client why.
				p := peerInfo{leaf: leaf}
				o.fail(raw.RemoteAddr(), tlsNameNotAllowed, p.identity(), nil)
			}
		}
	}
	return conn, info, nil
}

func (o *handshakeObserver) Clone() credentials.TransportCredentials {
	return &handshakeObserver{TransportCredentials: o.TransportCredentials.Clone(), failures: o.failures,
		counters: o.counters, allowed: o.allowed, log: o.log}
}

func (o *handshakeObserver) fail(addr net.Addr, reason, client string, err error) {
	o.counters[reason].Inc()
	o.log.Warn(func(ev *zerolog.Event) {
		if addr != nil {
			ev = ev.Str("peer_addr", addr.String())
		}
		if client != "" {
			ev = ev.Str("peer", client)
		}
		if err != nil {
			// Escaped: x509's messages quote the client's names.
			ev = ev.Str("error", state.Escape(cutTo(err.Error(), maxHandshakeError)))
		}
		ev.Str("reason", reason).Msg("TLS handshake refused")
	})
}

// maxHandshakeError is the most of a handshake error a line carries:
// x509's longest messages fit, a certificate stuffed with names does not.
const maxHandshakeError = 256

func cutTo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// limitedLog writes at most n lines per period; the first line after a
// period that dropped some says how many, as field "suppressed".
type limitedLog struct {
	log    zerolog.Logger
	n      int
	period time.Duration
	now    func() time.Time

	mu         sync.Mutex
	start      time.Time
	written    int
	suppressed int
}

func newLimitedLog(log zerolog.Logger, n int, period time.Duration) *limitedLog {
	return &limitedLog{log: log, n: n, period: period, now: time.Now}
}

// Warn calls fn with a warn event if the budget allows.
func (l *limitedLog) Warn(fn func(*zerolog.Event)) {
	l.mu.Lock()
	now := l.now()
	if now.Sub(l.start) >= l.period {
		l.start, l.written = now, 0
	}
	if l.written >= l.n {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	l.written++
	dropped := l.suppressed
	l.suppressed = 0
	l.mu.Unlock()
	ev := l.log.Warn()
	if ev == nil {
		return
	}
	if dropped > 0 {
		ev = ev.Int("suppressed", dropped)
	}
	fn(ev)
}

// expiryCollector is aegis_controlplane_certificate_expiry_timestamp_seconds:
// the server certificate's expiry and the earliest of the client CA
// file's, as loaded last (SIGHUP reloads them).
func (c *Certificates) expiryCollector() prometheus.Collector {
	return expiry{c: c, desc: prometheus.NewDesc("aegis_controlplane_certificate_expiry_timestamp_seconds",
		"Expiry (Unix time) of the TLS certificates in use: server, and client_ca (the earliest in the file).",
		[]string{"certificate"}, nil)}
}

type expiry struct {
	c    *Certificates
	desc *prometheus.Desc
}

func (e expiry) Describe(ch chan<- *prometheus.Desc) { ch <- e.desc }

func (e expiry) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(e.desc, prometheus.GaugeValue, float64(e.c.notAfter.Load()), "server")
	if ca := e.c.caNotAfter.Load(); ca != 0 {
		ch <- prometheus.MustNewConstMetric(e.desc, prometheus.GaugeValue, float64(ca), "client_ca")
	}
}

// earliestExpiry returns the earliest NotAfter of the PEM certificates in
// pemData, in Unix seconds; 0 if none parses.
func earliestExpiry(pemData []byte) int64 {
	var earliest int64
	for _, cert := range parsePEMCertificates(pemData) {
		if t := cert.NotAfter.Unix(); earliest == 0 || t < earliest {
			earliest = t
		}
	}
	return earliest
}

func parsePEMCertificates(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return out
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			out = append(out, c)
		}
	}
}
