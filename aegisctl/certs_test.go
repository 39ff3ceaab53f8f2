package aegisctl_test

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/aegisctl"
)

func TestCertsInitServerClient(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	certs := func(args ...string) []string { return append([]string{"certs", "--dir", dir}, args...) }

	if r := run(certs("server")...); r.code != 1 || !strings.Contains(r.stderr, "does not exist: create the CA with aegisctl certs init") {
		t.Fatalf("server before init: %+v", r)
	}
	mustRun(t, certs("init")...)
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want 0700", fi.Mode().Perm())
	}
	ca := readCert(t, filepath.Join(dir, "ca.crt"))
	if !ca.IsCA || ca.Subject.CommonName != "Aegis Agent CA" {
		t.Fatalf("CA %v", ca.Subject)
	}

	r := run(certs("server", "--dns", "gw1.example.org", "--ip", "192.0.2.1", "--ip", "2001:db8::1")...)
	if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "DNS aegis-agent,gw1.example.org; IP 192.0.2.1,2001:db8::1") {
		t.Fatalf("server: %+v", r)
	}
	server := readCert(t, filepath.Join(dir, "server.crt"))
	if !slices.Equal(server.DNSNames, []string{"aegis-agent", "gw1.example.org"}) || len(server.IPAddresses) != 2 ||
		!server.IPAddresses[0].Equal(net.ParseIP("192.0.2.1")) || !server.IPAddresses[1].Equal(net.ParseIP("2001:db8::1")) {
		t.Fatalf("server SANs %v %v", server.DNSNames, server.IPAddresses)
	}
	if len(server.ExtKeyUsage) != 1 || server.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || server.CheckSignatureFrom(ca) != nil {
		t.Fatalf("server certificate: usage %v, signature %v", server.ExtKeyUsage, server.CheckSignatureFrom(ca))
	}
	serverPEM, _ := os.ReadFile(filepath.Join(dir, "server.crt"))

	// Adding an operator touches neither the CA nor the server certificate.
	mustRun(t, certs("client", "aegis-controller", "ops2")...)
	client := readCert(t, filepath.Join(dir, "ops2.crt"))
	if client.Subject.CommonName != "ops2" || client.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth || client.CheckSignatureFrom(ca) != nil {
		t.Fatalf("client certificate %v %v", client.Subject, client.ExtKeyUsage)
	}
	if d := time.Until(client.NotAfter); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Fatalf("client certificate lifetime ends in %v", d)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, "server.crt")); !bytes.Equal(again, serverPEM) {
		t.Fatal("certs client rewrote the server certificate")
	}
	if !readCert(t, filepath.Join(dir, "ca.crt")).Equal(ca) {
		t.Fatal("certs client replaced the CA")
	}
	for _, f := range []string{"ca.crt", "ca.key", "server.crt", "server.key", "aegis-controller.crt", "aegis-controller.key", "ops2.crt", "ops2.key"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}

	// Without an IP SAN: written, with a warning.
	other := filepath.Join(t.TempDir(), "tls")
	mustRun(t, "certs", "--dir", other, "init")
	if r := run("certs", "--dir", other, "server"); r.code != 0 || !strings.Contains(r.stderr, "warning: the server certificate has no IP address") {
		t.Fatalf("server without --ip: %+v", r)
	}
	if r := run(certs("client", "../evil")...); r.code != 2 || !strings.Contains(r.stderr, `client name "../evil"`) {
		t.Fatalf("client ../evil: %+v", r)
	}
}

// No command replaces a file without --force; --force replaces only what
// it names.
func TestCertsNeverOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	certs := func(args ...string) []string { return append([]string{"certs", "--dir", dir}, args...) }
	mustRun(t, certs("init")...)
	mustRun(t, certs("server", "--ip", "192.0.2.1")...)
	mustRun(t, certs("client", "ops")...)
	snapshot := func() map[string][]byte {
		m := map[string][]byte{}
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			m[e.Name()], _ = os.ReadFile(filepath.Join(dir, e.Name()))
		}
		return m
	}
	before := snapshot()
	for _, args := range [][]string{certs("init"), certs("server"), certs("client", "ops"), certs("client", "new", "ops")} {
		r := run(args...)
		if r.code != 1 || !strings.Contains(r.stderr, "already exists: pass --force to replace it") {
			t.Errorf("aegisctl %s: %+v", strings.Join(args, " "), r)
		}
	}
	after := snapshot()
	if len(after) != len(before) {
		t.Fatalf("files %d, were %d (a refused command wrote something)", len(after), len(before))
	}
	for f, b := range before {
		if !bytes.Equal(after[f], b) {
			t.Errorf("%s changed", f)
		}
	}
	mustRun(t, certs("client", "--force", "ops")...)
	if bytes.Equal(snapshot()["ops.crt"], before["ops.crt"]) {
		t.Error("client --force did not replace ops.crt")
	}
	if !bytes.Equal(snapshot()["server.crt"], before["server.crt"]) || !bytes.Equal(snapshot()["ca.crt"], before["ca.crt"]) {
		t.Error("client --force touched another certificate")
	}
	mustRun(t, certs("init", "--force")...)
	if bytes.Equal(snapshot()["ca.crt"], before["ca.crt"]) {
		t.Error("init --force kept the CA")
	}
}

func TestCertsDirectoryMode(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	r := run("certs", "--dir", dir, "init")
	if r.code != 1 || !strings.Contains(r.stderr, "has mode 0750: it holds private keys and must be 0700: chmod 0700 "+dir) {
		t.Fatalf("init in a 0750 directory: %+v", r)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("refused init wrote %d files", len(entries))
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o750 {
		t.Fatalf("the mode was changed to %v", fi.Mode().Perm())
	}
}

func TestCertsListAndRenew(t *testing.T) {
	dir := pkiDir(t)
	other := pkiDir(t)
	certs := func(args ...string) []string { return append([]string{"certs", "--dir", dir}, args...) }
	writeLeaf(t, dir, "old", time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(2021, 1, 1, 0, 0, 0, 0, time.UTC))
	copyFile(t, filepath.Join(other, "ops.crt"), filepath.Join(dir, "stranger.crt"))
	copyFile(t, filepath.Join(other, "ops.key"), filepath.Join(dir, "stranger.key"))
	mustRun(t, certs("client", "nokey")...)
	if err := os.Remove(filepath.Join(dir, "nokey.key")); err != nil {
		t.Fatal(err)
	}

	var infos []aegisctl.CertInfo
	if err := json.Unmarshal([]byte(mustRun(t, certs("list", "--json")...)), &infos); err != nil {
		t.Fatal(err)
	}
	got := map[string]aegisctl.CertInfo{}
	var order []string
	for _, i := range infos {
		got[i.File] = i
		order = append(order, i.File)
	}
	if !slices.Equal(order[:2], []string{"ca.crt", "server.crt"}) || len(order) != 7 {
		t.Fatalf("listed %v", order)
	}
	for file, want := range map[string]struct {
		status   string
		verifies bool
		issuer   string
	}{
		"ca.crt":               {"ok", true, "self (the CA)"},
		"server.crt":           {"ok", true, "ca.crt"},
		"aegis-controller.crt": {"ok", true, "ca.crt"},
		"old.crt":              {"expired", false, "ca.crt"},
		"stranger.crt":         {"not issued by ca.crt", false, "Aegis Agent CA"},
		"nokey.crt":            {"ok, no key", false, "ca.crt"},
	} {
		if i := got[file]; i.Status != want.status || i.Verifies != want.verifies || i.Issuer != want.issuer {
			t.Errorf("%s: %+v, want status %q verifies %v issuer %q", file, i, want.status, want.verifies, want.issuer)
		}
	}
	if s := got["server.crt"]; !slices.Equal(s.DNSNames, []string{"aegis-agent"}) || !slices.Equal(s.IPs, []string{"127.0.0.1"}) ||
		s.Subject != "aegis-agent" || time.Until(s.NotAfter) < 364*24*time.Hour {
		t.Errorf("server.crt: %+v", s)
	}
	table := mustRun(t, certs("list")...)
	if lines := strings.Split(strings.TrimSpace(table), "\n"); len(lines) != 8 || !strings.HasPrefix(lines[0], "FILE ") ||
		!strings.Contains(lines[2], "aegis-agent,127.0.0.1") {
		t.Fatalf("list:\n%s", table)
	}

	// Renew: same names, new key, new serial; the expired one verifies again.
	oldServer := readCert(t, filepath.Join(dir, "server.crt"))
	mustRun(t, certs("renew", "server", "--lifetime", "48h")...)
	renewed := readCert(t, filepath.Join(dir, "server.crt"))
	if !slices.Equal(renewed.DNSNames, oldServer.DNSNames) || len(renewed.IPAddresses) != 1 || !renewed.IPAddresses[0].Equal(oldServer.IPAddresses[0]) ||
		renewed.SerialNumber.Cmp(oldServer.SerialNumber) == 0 || renewed.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(oldServer.PublicKey) {
		t.Fatalf("renewed %v %v serial %v", renewed.DNSNames, renewed.IPAddresses, renewed.SerialNumber)
	}
	if d := time.Until(renewed.NotAfter); d < 47*time.Hour || d > 49*time.Hour {
		t.Fatalf("renewed certificate ends in %v", d)
	}
	mustRun(t, certs("renew", "old")...)
	mustRun(t, certs("renew", "stranger")...)
	if err := json.Unmarshal([]byte(mustRun(t, certs("list", "--json")...)), &infos); err != nil {
		t.Fatal(err)
	}
	for _, i := range infos {
		if (i.File == "old.crt" || i.File == "stranger.crt" || i.File == "server.crt") && (!i.Verifies || i.Issuer != "ca.crt") {
			t.Errorf("after renew: %+v", i)
		}
	}
	if r := run(certs("renew", "missing")...); r.code != 1 || !strings.Contains(r.stderr, "renew missing: ") {
		t.Fatalf("renew missing: %+v", r)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// --json of the commands that write: the certificates written, one
// object each, and nothing else on stdout.
func TestCertsJSON(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	certs := func(args ...string) []aegisctl.WrittenCert {
		t.Helper()
		var ws []aegisctl.WrittenCert
		out := mustRun(t, append([]string{"certs", "--dir", dir}, args...)...)
		if err := json.Unmarshal([]byte(out), &ws); err != nil {
			t.Fatalf("certs %v: %v\n%s", args, err, out)
		}
		return ws
	}
	if ws := certs("init", "--json"); len(ws) != 1 || ws[0].File != filepath.Join(dir, "ca.crt") || ws[0].Subject != "Aegis Agent CA" {
		t.Fatalf("init --json: %+v", ws)
	}
	ws := certs("server", "--json", "--ip", "192.0.2.1")
	if len(ws) != 1 || ws[0].KeyFile != filepath.Join(dir, "server.key") || !slices.Equal(ws[0].IPs, []string{"192.0.2.1"}) ||
		!slices.Equal(ws[0].DNSNames, []string{"aegis-agent"}) || ws[0].Issuer != "Aegis Agent CA" {
		t.Fatalf("server --json: %+v", ws)
	}
	ws = certs("client", "--json", "aegis-controller", "ops2")
	if len(ws) != 2 || ws[0].Subject != "aegis-controller" || ws[1].File != filepath.Join(dir, "ops2.crt") {
		t.Fatalf("client --json: %+v", ws)
	}
	if !readCert(t, ws[1].File).NotAfter.Equal(ws[1].NotAfter) {
		t.Fatalf("client --json: not_after %v is not the certificate's", ws[1].NotAfter)
	}
	if ws := certs("renew", "--json", "ops2"); len(ws) != 1 || ws[0].Subject != "ops2" {
		t.Fatalf("renew --json: %+v", ws)
	}

	var js bytes.Buffer
	if err := aegisctl.WriteJSON(&js, []aegisctl.WrittenCert{{File: "/etc/aegis/tls/server.crt", KeyFile: "/etc/aegis/tls/server.key",
		Subject: "aegis-agent", DNSNames: []string{"aegis-agent"}, IPs: []string{"198.51.100.1", "2001:db8::1"},
		NotAfter: time.Date(2027, 11, 26, 12, 0, 0, 0, time.UTC), Issuer: "Aegis Agent CA"}}); err != nil {
		t.Fatal(err)
	}
	golden(t, "certs.json.golden", js.String())
}
