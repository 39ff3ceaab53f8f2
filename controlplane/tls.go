package controlplane

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/credentials"

	"github.com/aegis-agent/aegis/internal/pki"
)

// ErrTLS means the certificate files cannot be used.
var ErrTLS = errors.New("unusable TLS files")

// Certificates is the server's mutual TLS material: its certificate and
// key, and the CA that issues client certificates. Reload re-reads the
// files (on SIGHUP); connections made afterwards use the new ones, and a
// failed reload keeps the old ones.
type Certificates struct {
	certFile, keyFile, clientCAFile string
	log                             zerolog.Logger

	cur      atomic.Pointer[tls.Config]
	notAfter atomic.Int64 // unix seconds: the server certificate's expiry
	// caNotAfter is the earliest expiry of the client CA file's
	// certificates, unix seconds (tlsmetrics.go).
	caNotAfter atomic.Int64
	reloads    atomic.Uint64
	failures   atomic.Uint64
}

// LoadCertificates reads the server certificate and key and the client CA.
// Returns an error wrapping ErrTLS, naming the file, if one is missing,
// malformed, or the certificate is expired or not yet valid.
func LoadCertificates(certFile, keyFile, clientCAFile string, log zerolog.Logger) (*Certificates, error) {
	c := &Certificates{certFile: certFile, keyFile: keyFile, clientCAFile: clientCAFile, log: log}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload re-reads the files. On error the certificates loaded before stay
// in use, and the error says why the new ones were refused.
func (c *Certificates) Reload() error {
	if err := c.load(); err != nil {
		c.failures.Add(1)
		c.log.Error().Err(err).Msg("reload TLS files: keeping the ones loaded before")
		return err
	}
	c.reloads.Add(1)
	return nil
}

func (c *Certificates) load() error {
	pair, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("%w: server certificate %s and key %s: %v", ErrTLS, c.certFile, c.keyFile, err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrTLS, c.certFile, err)
		}
	}
	now := time.Now()
	switch {
	case now.After(leaf.NotAfter):
		return fmt.Errorf("%w: server certificate %s expired at %s", ErrTLS, c.certFile, leaf.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("%w: server certificate %s is valid only from %s", ErrTLS, c.certFile, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	caPEM, err := os.ReadFile(c.clientCAFile)
	if err != nil {
		return fmt.Errorf("%w: client CA: %v", ErrTLS, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%w: client CA %s holds no PEM certificate", ErrTLS, c.clientCAFile)
	}
	if !slices.Contains(leaf.DNSNames, pki.ServerName) {
		c.log.Warn().Str("file", c.certFile).Strs("dns_names", leaf.DNSNames).
			Msgf("server certificate lacks the DNS name %s, which the Aegis controller verifies", pki.ServerName)
	}
	c.cur.Store(&tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		// TLS 1.2 for controllers that cannot do 1.3; Go offers only
		// forward-secret AEAD suites for it by default.
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2"},
	})
	c.notAfter.Store(leaf.NotAfter.Unix())
	c.caNotAfter.Store(earliestExpiry(caPEM))
	c.log.Info().Str("cert", c.certFile).Str("client_ca", c.clientCAFile).Str("subject", leaf.Subject.CommonName).
		Time("not_after", leaf.NotAfter).Msg("loaded TLS files")
	return nil
}

// NotAfter is the expiry of the server certificate in use.
func (c *Certificates) NotAfter() time.Time { return time.Unix(c.notAfter.Load(), 0) }

// TLSConfig returns the listener's configuration: every handshake uses
// the files loaded last.
func (c *Certificates) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2"},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return c.cur.Load(), nil
		},
	}
}

// credentials returns the gRPC transport credentials for the listener.
func (c *Certificates) credentials() credentials.TransportCredentials {
	return credentials.NewTLS(c.TLSConfig())
}
