package pki_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/pki"
)

func TestIssuedCertificatesVerify(t *testing.T) {
	ca, err := pki.NewCA("aegis test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.Cert.IsCA || !ca.Cert.MaxPathLenZero || ca.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Fatalf("CA certificate constraints: %+v", ca.Cert)
	}
	srv, err := ca.IssueServer(pki.ServerOptions{DNSNames: []string{"gw1.example.net"}, IPs: []net.IP{net.ParseIP("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(srv.Cert.DNSNames, []string{pki.ServerName, "gw1.example.net"}) {
		t.Fatalf("server DNS SANs %v", srv.Cert.DNSNames)
	}
	if len(srv.Cert.IPAddresses) != 1 || !srv.Cert.IPAddresses[0].Equal(net.ParseIP("192.0.2.1")) {
		t.Fatalf("server IP SANs %v", srv.Cert.IPAddresses)
	}
	cli, err := ca.IssueClient("controller", 0)
	if err != nil {
		t.Fatal(err)
	}
	if cli.Cert.Subject.CommonName != "controller" || !slices.Equal(cli.Cert.DNSNames, []string{"controller"}) {
		t.Fatalf("client names: CN %q SANs %v", cli.Cert.Subject.CommonName, cli.Cert.DNSNames)
	}
	for _, c := range []struct {
		name  string
		cert  *x509.Certificate
		usage x509.ExtKeyUsage
		dns   string
	}{
		{"server as aegis-agent", srv.Cert, x509.ExtKeyUsageServerAuth, pki.ServerName},
		{"server as extra name", srv.Cert, x509.ExtKeyUsageServerAuth, "gw1.example.net"},
		{"server as IP", srv.Cert, x509.ExtKeyUsageServerAuth, "192.0.2.1"},
		{"client", cli.Cert, x509.ExtKeyUsageClientAuth, ""},
	} {
		_, err := c.cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), DNSName: c.dns, KeyUsages: []x509.ExtKeyUsage{c.usage}})
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// A server certificate is not a client certificate and vice versa.
	if _, err := srv.Cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("server certificate verifies for client auth")
	}
	if _, err := cli.Cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("client certificate verifies for server auth")
	}
	// Another CA's pool does not verify them.
	other, err := pki.NewCA("other CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Cert.Verify(x509.VerifyOptions{Roots: other.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("client certificate verifies against another CA")
	}
}

func TestLifetimes(t *testing.T) {
	ca, err := pki.NewCA("ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(ca.Cert.NotAfter); d > time.Hour || d < 59*time.Minute {
		t.Fatalf("CA valid for %v, want 1h", d)
	}
	if time.Since(ca.Cert.NotBefore) < time.Minute {
		t.Fatal("NotBefore is not backdated for clock skew")
	}
	// A leaf never outlives its CA.
	leaf, err := ca.IssueClient("c", 0)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.Cert.NotAfter.After(ca.Cert.NotAfter) {
		t.Fatalf("leaf expires %v after its CA %v", leaf.Cert.NotAfter, ca.Cert.NotAfter)
	}
	def, err := pki.NewCA("ca", 0)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := def.IssueServer(pki.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(srv.Cert.NotAfter); d < pki.DefaultLeafLifetime-time.Minute || d > pki.DefaultLeafLifetime {
		t.Fatalf("default leaf lifetime %v", d)
	}
}

func TestBadRequests(t *testing.T) {
	ca, err := pki.NewCA("ca", 0)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"empty CA name":     func() error { _, err := pki.NewCA(" ", 0); return err },
		"negative lifetime": func() error { _, err := ca.IssueClient("c", -time.Hour); return err },
		"empty client name": func() error { _, err := ca.IssueClient("", 0); return err },
		"bad DNS name": func() error {
			_, err := ca.IssueServer(pki.ServerOptions{DNSNames: []string{"bad name"}})
			return err
		},
		"DNS label too long": func() error {
			_, err := ca.IssueServer(pki.ServerOptions{DNSNames: []string{strings.Repeat("a", 64) + ".example"}})
			return err
		},
	} {
		if err := f(); !errors.Is(err, pki.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	// A client name that is no host name still goes into the CN.
	c, err := ca.IssueClient("Jane Operator", 0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Cert.Subject.CommonName != "Jane Operator" || len(c.Cert.DNSNames) != 0 {
		t.Fatalf("CN %q SANs %v", c.Cert.Subject.CommonName, c.Cert.DNSNames)
	}
}

func TestFilesRoundTrip(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.NewCA("ca", 0)
	if err != nil {
		t.Fatal(err)
	}
	caCert, caKey := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	if err := ca.WriteFiles(caCert, caKey); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{caCert, caKey} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	loaded, err := pki.LoadCA(caCert, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Cert.Equal(ca.Cert) || !loaded.Key.Equal(ca.Key) {
		t.Fatal("loaded CA differs")
	}
	// The loaded CA issues certificates the original's pool accepts.
	cli, err := loaded.IssueClient("c", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Cert.Verify(x509.VerifyOptions{Roots: ca.CertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	// Overwriting leaves no temporary files behind.
	if err := cli.WriteFiles(caCert+".c", caKey+".c"); err != nil {
		t.Fatal(err)
	}
	if err := cli.WriteFiles(caCert+".c", caKey+".c"); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		t.Fatalf("%d files in the directory, want 4", len(entries))
	}

	// Not a CA; a key of another certificate; garbage.
	if _, err := pki.LoadCA(caCert+".c", caKey+".c"); !errors.Is(err, pki.ErrInvalid) {
		t.Errorf("leaf loaded as a CA: %v", err)
	}
	if _, err := pki.LoadPair(caCert, caKey+".c"); !errors.Is(err, pki.ErrInvalid) {
		t.Errorf("mismatched key: %v", err)
	}
	junk := filepath.Join(dir, "junk")
	if err := os.WriteFile(junk, []byte("not PEM"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := pki.LoadPair(junk, caKey); !errors.Is(err, pki.ErrInvalid) {
		t.Errorf("junk certificate: %v", err)
	}
	if _, err := pki.LoadPair(caCert, junk); !errors.Is(err, pki.ErrInvalid) {
		t.Errorf("junk key: %v", err)
	}
	if _, err := pki.LoadPair(filepath.Join(dir, "missing"), caKey); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// The issued certificates work for mutual TLS as the controller dials the
// agent: server name aegis-agent, client certificate required.
func TestMutualTLSHandshake(t *testing.T) {
	ca, err := pki.NewCA("ca", 0)
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := ca.IssueServer(pki.ServerOptions{})
	cli, _ := ca.IssueClient("controller", 0)
	srvCert, err := srv.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	cliCert, err := cli.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{srvCert}, ClientCAs: ca.CertPool(),
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			peer <- err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			peer <- err.Error()
			return
		}
		peer <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
		_, _ = io.Copy(io.Discard, c)
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		ServerName: pki.ServerName, RootCAs: ca.CertPool(), Certificates: []tls.Certificate{cliCert},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if got := <-peer; got != "controller" {
		t.Fatalf("server saw %q", got)
	}
}

func TestRenewKeepsNamesAndChangesKey(t *testing.T) {
	ca, err := pki.NewCA("aegis test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	old, err := ca.IssueServer(pki.ServerOptions{DNSNames: []string{"gw1.example.net"}, IPs: []net.IP{net.ParseIP("2001:db8::1")}, Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	other, err := pki.NewCA("another CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	// Renewed under another CA: the way a certificate moves to a new CA.
	renewed, err := other.Renew(old.Cert, 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := renewed.Cert
	if !slices.Equal(c.DNSNames, old.Cert.DNSNames) || len(c.IPAddresses) != 1 || !c.IPAddresses[0].Equal(old.Cert.IPAddresses[0]) ||
		c.Subject.CommonName != pki.ServerName || !slices.Equal(c.ExtKeyUsage, old.Cert.ExtKeyUsage) || c.KeyUsage != old.Cert.KeyUsage {
		t.Fatalf("renewed %+v", c)
	}
	if renewed.Key.PublicKey.Equal(&old.Key.PublicKey) || c.SerialNumber.Cmp(old.Cert.SerialNumber) == 0 {
		t.Fatal("renewal kept the key or the serial number")
	}
	if d := time.Until(c.NotAfter); d < 47*time.Hour || d > 49*time.Hour {
		t.Fatalf("renewed certificate ends in %v", d)
	}
	if err := other.Verify(c); err != nil {
		t.Fatalf("renewed certificate does not verify under its new CA: %v", err)
	}
	var unknown x509.UnknownAuthorityError
	if err := ca.Verify(c); !errors.As(err, &unknown) {
		t.Fatalf("verify under the old CA: %v, want UnknownAuthorityError", err)
	}
	if _, err := ca.Renew(ca.Cert, 0); !errors.Is(err, pki.ErrInvalid) {
		t.Fatalf("renewing a CA: %v, want ErrInvalid", err)
	}
}
