package aegisctl_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// pkiDir is a directory made by aegisctl certs: CA, server certificate,
// clients aegis-controller and ops.
func pkiDir(t *testing.T) string {
	t.Helper()
	return pkiDirOf(t, "Aegis Agent CA")
}

// pkiDirOf is pkiDir with a CA named caName.
func pkiDirOf(t *testing.T, caName string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	mustRun(t, "certs", "--dir", dir, "init", "--name", caName)
	mustRun(t, "certs", "--dir", dir, "server", "--ip", "127.0.0.1")
	mustRun(t, "certs", "--dir", dir, "client", "aegis-controller", "ops")
	return dir
}

// writeLeaf writes a server certificate for aegis-agent signed by the CA
// in dir, valid from notBefore to notAfter, as name.crt and name.key.
func writeLeaf(t *testing.T, dir, name string, notBefore, notAfter time.Time) {
	t.Helper()
	ca, err := pki.LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: pki.ServerName},
		DNSNames: []string{pki.ServerName}, NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := &pki.Pair{CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}
	if err := p.WriteFiles(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")); err != nil {
		t.Fatal(err)
	}
}

// tlsListener serves TLS handshakes with certFile/keyFile and nothing
// else: for certificates the control plane itself refuses to load.
func tlsListener(t *testing.T, certFile, keyFile string) string {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
			}()
		}
	}()
	return ln.Addr().String()
}

func loadCerts(t *testing.T, dir string) *controlplane.Certificates {
	t.Helper()
	c, err := controlplane.LoadCertificates(filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"),
		filepath.Join(dir, "ca.crt"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Each cause of a failed connection is one line naming it and the fix,
// against a real server set up to produce it.
func TestTLSFailuresExplained(t *testing.T) {
	pin := tu.PinDir(t)
	tu.PinMaps(t, pin, tu.PinOptions{DefaultIdleTimeout: time.Minute})
	// other's CA has the same name as good's: the server cannot tell them
	// apart before verifying; foreign's has its own.
	good, other, foreign := pkiDir(t), pkiDir(t), pkiDirOf(t, "Example Corp CA")
	f := func(dir, name string) string { return filepath.Join(dir, name) }
	client := func(dir, name, ca string) []string {
		return []string{"--tls-cert", f(dir, name+".crt"), "--tls-key", f(dir, name+".key"), "--tls-ca", ca, "--timeout", "5s"}
	}
	controller := client(good, "aegis-controller", f(good, "ca.crt"))

	mtls, _ := startControlPlane(t, pin, loadCerts(t, good), []string{"aegis-controller"}, "127.0.0.1:0")
	plain, _ := startControlPlane(t, pin, nil, nil, "127.0.0.1:0")
	writeLeaf(t, good, "expired", time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(2021, 1, 1, 0, 0, 0, 0, time.UTC))
	expired := tlsListener(t, f(good, "expired.crt"), f(good, "expired.key"))
	writeLeaf(t, good, "future", time.Date(2999, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC))
	future := tlsListener(t, f(good, "future.crt"), f(good, "future.key"))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	// Accepts connections and never says a word.
	silentLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silentLn.Close() })
	go func() {
		for {
			c, err := silentLn.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	silent := silentLn.Addr().String()

	for _, c := range []struct {
		golden, addr string
		args         []string
	}{
		{"unknown-ca", mtls, client(good, "aegis-controller", f(other, "ca.crt"))},
		{"name-mismatch", mtls, append(controller, "--server-name", "gw9.example.org")},
		{"server-expired", expired, controller},
		{"server-not-yet-valid", future, controller},
		{"client-other-ca", mtls, client(other, "aegis-controller", f(good, "ca.crt"))},
		{"client-foreign-ca", mtls, client(foreign, "aegis-controller", f(good, "ca.crt"))},
		{"client-not-a-client-certificate", mtls, client(good, "server", f(good, "ca.crt"))},
		{"client-not-allowed", mtls, client(good, "ops", f(good, "ca.crt"))},
		{"insecure-against-tls", mtls, []string{"--insecure", "--timeout", "5s"}},
		{"tls-against-plaintext", plain, controller},
		{"connection-refused", closed, controller},
		{"no-answer", silent, append(controller, "--timeout", "1s")},
	} {
		t.Run(c.golden, func(t *testing.T) {
			args := append([]string{"stats", "--address", c.addr}, c.args...)
			r := run(args...)
			if r.code != 1 {
				t.Fatalf("aegisctl %s: exit %d, want 1\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
			}
			line := strings.NewReplacer(c.addr, "ADDR", good, "GOOD", other, "OTHER", foreign, "FOREIGN").Replace(r.stderr)
			golden(t, filepath.Join("tls", c.golden+".golden"), line)
		})
	}
}
