// Package pki issues the certificates of Aegis's mutual TLS: a private CA,
// the agent's server certificate (SAN "aegis-agent", the name the Aegis
// controller expects) and client certificates for controllers and
// operators. Keys are ECDSA P-256; files are written 0600, atomically.
//
// It is what `aegisctl certs` and the tests use; a deployment may as well
// bring certificates from its own PKI.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ServerName is the name the Aegis controller verifies the agent's
// certificate against (tls.Config.ServerName); every server certificate
// carries it as a DNS SAN.
const ServerName = "aegis-agent"

// Default lifetimes.
const (
	DefaultCALifetime   = 10 * 365 * 24 * time.Hour
	DefaultLeafLifetime = 365 * 24 * time.Hour
)

// backdate tolerates clocks a little behind the issuer's.
const backdate = 5 * time.Minute

// ErrInvalid means a name, lifetime or file content is unusable.
var ErrInvalid = errors.New("invalid certificate request")

// Pair is a certificate with its private key.
type Pair struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// CertPEM and KeyPEM are the PEM encodings (the key as PKCS #8).
	CertPEM []byte
	KeyPEM  []byte
}

// CA is a certificate authority that issues the other certificates.
type CA struct{ Pair }

// NewCA creates a self-signed CA named name, valid for lifetime (0 for
// DefaultCALifetime). It can sign leaf certificates only (path length 0).
func NewCA(name string, lifetime time.Duration) (*CA, error) {
	if strings.TrimSpace(name) == "" {
		return nil, fmt.Errorf("%w: CA name is empty", ErrInvalid)
	}
	tmpl, err := template(name, lifetime, DefaultCALifetime)
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.MaxPathLenZero = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	p, err := sign(tmpl, tmpl, key, key)
	if err != nil {
		return nil, err
	}
	return &CA{*p}, nil
}

// LoadCA reads a CA certificate and its key from PEM files, as written by
// CA.WriteFiles.
func LoadCA(certFile, keyFile string) (*CA, error) {
	p, err := LoadPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	if !p.Cert.IsCA {
		return nil, fmt.Errorf("%w: %s is not a CA certificate", ErrInvalid, certFile)
	}
	return &CA{*p}, nil
}

// ServerOptions describe a server certificate.
type ServerOptions struct {
	// DNSNames are added to ServerName as DNS SANs.
	DNSNames []string
	// IPs are added as IP SANs, for clients that dial an address and
	// verify it.
	IPs []net.IP
	// Lifetime; 0 for DefaultLeafLifetime.
	Lifetime time.Duration
}

// IssueServer issues the agent's server certificate: common name and
// first DNS SAN ServerName, then opts.DNSNames and opts.IPs.
func (ca *CA) IssueServer(opts ServerOptions) (*Pair, error) {
	tmpl, err := template(ServerName, opts.Lifetime, DefaultLeafLifetime)
	if err != nil {
		return nil, err
	}
	tmpl.DNSNames = []string{ServerName}
	for _, n := range opts.DNSNames {
		if err := checkDNSName(n); err != nil {
			return nil, err
		}
		if n != ServerName {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	tmpl.IPAddresses = append(tmpl.IPAddresses, opts.IPs...)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	return ca.issue(tmpl)
}

// IssueClient issues a client certificate for name (a controller, an
// operator): the common name is name, and so is the one DNS SAN when name
// is a valid host name. aegis-controlplane --allowed-client-name matches
// either.
func (ca *CA) IssueClient(name string, lifetime time.Duration) (*Pair, error) {
	if strings.TrimSpace(name) == "" {
		return nil, fmt.Errorf("%w: client name is empty", ErrInvalid)
	}
	tmpl, err := template(name, lifetime, DefaultLeafLifetime)
	if err != nil {
		return nil, err
	}
	if checkDNSName(name) == nil {
		tmpl.DNSNames = []string{name}
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	return ca.issue(tmpl)
}

// Renew issues a new certificate for what old certifies: its subject,
// names, addresses and key usages, with a new key, a new serial number
// and lifetime from now (0 for DefaultLeafLifetime). old need not be from
// ca, so that renewing under a new CA moves a certificate to it. A CA
// certificate is not renewed this way: a new CA needs new leaves.
func (ca *CA) Renew(old *x509.Certificate, lifetime time.Duration) (*Pair, error) {
	if old.IsCA {
		return nil, fmt.Errorf("%w: %q is a CA certificate: create a new CA instead", ErrInvalid, old.Subject.CommonName)
	}
	tmpl, err := template(old.Subject.CommonName, lifetime, DefaultLeafLifetime)
	if err != nil {
		return nil, err
	}
	tmpl.Subject = old.Subject
	tmpl.DNSNames = slices.Clone(old.DNSNames)
	tmpl.IPAddresses = slices.Clone(old.IPAddresses)
	tmpl.KeyUsage = old.KeyUsage
	tmpl.ExtKeyUsage = slices.Clone(old.ExtKeyUsage)
	return ca.issue(tmpl)
}

// Verify checks that cert was issued by ca and is valid now, for any key
// usage. The error is x509's (UnknownAuthorityError,
// CertificateInvalidError, ...).
func (ca *CA) Verify(cert *x509.Certificate) error {
	_, err := cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func (ca *CA) issue(tmpl *x509.Certificate) (*Pair, error) {
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		// A leaf outliving its CA would fail verification early, silently.
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	return sign(tmpl, ca.Cert, key, ca.Key)
}

// CertPool returns a pool holding only the CA, for tls.Config.RootCAs or
// ClientCAs.
func (ca *CA) CertPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return pool
}

// TLSCertificate returns the pair for tls.Config.Certificates.
func (p *Pair) TLSCertificate() (tls.Certificate, error) {
	return tls.X509KeyPair(p.CertPEM, p.KeyPEM)
}

// WriteFiles writes the certificate and the key as PEM files, each 0600
// and each replaced atomically: a reader (a daemon reloading on SIGHUP)
// sees the old file or the new one, never a part. It overwrites existing
// files; callers that must not replace a CA check first.
func (p *Pair) WriteFiles(certFile, keyFile string) error {
	if err := WriteFile(certFile, p.CertPEM); err != nil {
		return err
	}
	return WriteFile(keyFile, p.KeyPEM)
}

// WriteFile writes data to path with mode 0600 through a temporary file in
// the same directory and a rename.
func WriteFile(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename this fails harmlessly
	// CreateTemp already uses 0600; be explicit against a future change.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// LoadPair reads a certificate (the first PEM block) and its private key.
// Returns an error wrapping ErrInvalid if either is malformed or they do
// not belong together.
func LoadPair(certFile, keyFile string) (*Pair, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	cert, err := ParseCertificatePEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, fmt.Errorf("%w: %s holds no PEM block", ErrInvalid, keyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		if k, err = x509.ParseECPrivateKey(block.Bytes); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, keyFile, err)
		}
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: %s is not an ECDSA key", ErrInvalid, keyFile)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: key %s does not match certificate %s", ErrInvalid, keyFile, certFile)
	}
	return &Pair{Cert: cert, Key: key, CertPEM: certPEM, KeyPEM: keyPEM}, nil
}

// ParseCertificatePEM parses the first certificate of a PEM file.
func ParseCertificatePEM(data []byte) (*x509.Certificate, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, fmt.Errorf("%w: no CERTIFICATE PEM block", ErrInvalid)
		}
		if block.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
			}
			return c, nil
		}
	}
}

func template(cn string, lifetime, def time.Duration) (*x509.Certificate, error) {
	if lifetime < 0 {
		return nil, fmt.Errorf("%w: negative lifetime", ErrInvalid)
	}
	if lifetime == 0 {
		lifetime = def
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(lifetime),
	}, nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return key, nil
}

func sign(tmpl, parent *x509.Certificate, key *ecdsa.PrivateKey, signer crypto.Signer) (*Pair, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %q: %w", tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse issued certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return &Pair{
		Cert:    cert,
		Key:     key,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// checkDNSName accepts host names as certificates carry them: labels of
// letters, digits and hyphens, optionally a leading "*." wildcard.
func checkDNSName(n string) error {
	name := strings.TrimPrefix(n, "*.")
	if name == "" || len(n) > 253 {
		return fmt.Errorf("%w: DNS name %q", ErrInvalid, n)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%w: DNS name %q", ErrInvalid, n)
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("%w: DNS name %q", ErrInvalid, n)
			}
		}
	}
	return nil
}
