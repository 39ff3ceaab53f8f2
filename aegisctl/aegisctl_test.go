package aegisctl_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

var update = flag.Bool("update", false, "rewrite the golden files")

type result struct {
	code           int
	stdout, stderr string
}

func run(args ...string) result {
	var out, errb bytes.Buffer
	code := aegisctl.Main(context.Background(), args, cli.IO{Stdout: &out, Stderr: &errb})
	return result{code, out.String(), errb.String()}
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	r := run(args...)
	if r.code != 0 {
		t.Fatalf("aegisctl %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// env is a real control plane over mutual TLS on loopback, with
// certificates made by "aegisctl certs", over freshly pinned maps.
type env struct {
	pin, dir, addr string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{pin: tu.PinDir(t), dir: t.TempDir()}
	tu.PinMaps(t, e.pin, tu.PinOptions{DefaultIdleTimeout: time.Minute})
	mustRun(t, "certs", "--dir", e.dir, "--client", "aegis-controller")

	log := zerolog.Nop()
	certs, err := controlplane.LoadCertificates(e.file("server.crt"), e.file("server.key"), e.file("ca.crt"), log)
	if err != nil {
		t.Fatal(err)
	}
	h := state.NewHandle(e.pin, state.OpenOptions{Writable: true}, log)
	t.Cleanup(func() { h.Close() })
	srv, err := controlplane.New(controlplane.Options{Maps: h, Log: log, Certificates: certs,
		MonitorInterval: time.Second, RefreshInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return e
}

func (e *env) file(name string) string { return filepath.Join(e.dir, name) }

// conn are the connection flags of a controller's aegisctl.
func (e *env) conn() []string {
	return []string{"--address", e.addr, "--tls-cert", e.file("aegis-controller.crt"),
		"--tls-key", e.file("aegis-controller.key"), "--tls-ca", e.file("ca.crt")}
}

func (e *env) cmd(args ...string) []string { return append(args, e.conn()...) }

func (e *env) maps(t *testing.T) *state.Maps {
	t.Helper()
	m, err := state.Open(e.pin, state.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestLoginSessionsLogout(t *testing.T) {
	e := newEnv(t)
	out := mustRun(t, e.cmd("login", "--user", "alice", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "8080", "--idle-timeout", "5m")...)
	if !strings.HasPrefix(out, "granted: alice tcp 192.0.2.10 -> 198.51.100.10:8080, idle timeout 5m0s") {
		t.Fatalf("login: %q", out)
	}
	key := state.Key{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.10"), Port: 8080, Proto: state.TCP}
	s, err := e.maps(t).Lookup(key)
	if err != nil || s.User != "alice" || s.IdleTimeout != 5*time.Minute {
		t.Fatalf("the map holds %+v (%v)", s, err)
	}
	if out := mustRun(t, e.cmd("login", "-u", "alice", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "8080")...); !strings.HasPrefix(out, "refreshed: ") {
		t.Fatalf("second login: %q", out)
	}
	mustRun(t, e.cmd("login", "-u", "bob", "--src", "2001:db8:1::10", "--dst", "2001:db8:2::10", "--port", "53", "--proto", "udp", "--max-lifetime", "1h")...)

	table := mustRun(t, e.cmd("sessions")...)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "USER ") || !strings.HasPrefix(lines[1], "alice ") ||
		!strings.HasPrefix(lines[2], "bob ") || lines[3] != "2 session(s)" {
		t.Fatalf("sessions table:\n%s", table)
	}
	if !strings.Contains(lines[2], "[2001:db8:2::10]:53") || !strings.Contains(lines[2], "udp") || !strings.Contains(lines[2], "active") {
		t.Fatalf("bob's row: %q", lines[2])
	}

	var rows []aegisctl.SessionRow
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("sessions", "--json", "--user", "bob")...)), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].User != "bob" || rows[0].Protocol != "udp" || rows[0].Expires.IsZero() ||
		rows[0].Dest != netip.MustParseAddrPort("[2001:db8:2::10]:53") {
		t.Fatalf("json: %+v", rows)
	}

	if out := mustRun(t, e.cmd("logout", "--user", "alice")...); out != "revoked 1 session(s)\n" {
		t.Fatalf("logout: %q", out)
	}
	if _, err := e.maps(t).Lookup(key); err == nil {
		t.Fatal("alice's session is still in the map")
	}
	if out := mustRun(t, e.cmd("logout", "--src", "2001:db8:1::10", "--dst", "2001:db8:2::10", "--port", "53", "--proto", "udp")...); out != "revoked 1 session(s)\n" {
		t.Fatalf("logout by key: %q", out)
	}
	if n4, n6, _ := e.maps(t).Count(); n4+n6 != 0 {
		t.Fatalf("%d sessions left", n4+n6)
	}
}

func TestStatsAndLocal(t *testing.T) {
	e := newEnv(t)
	mustRun(t, e.cmd("login", "-u", "carol", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "22")...)

	var remote, local aegisctl.Stats
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("stats", "--json")...)), &remote); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(mustRun(t, "local", "stats", "--json", "--pin-path", e.pin)), &local); err != nil {
		t.Fatal(err)
	}
	if len(remote.Counters) != len(state.Reasons) || remote.Maps[0].Entries != 1 || remote.Maps[0].Capacity == 0 {
		t.Fatalf("remote stats %+v", remote)
	}
	if len(local.Counters) != len(remote.Counters) || local.Maps[0] != remote.Maps[0] || local.Maps[1] != remote.Maps[1] {
		t.Fatalf("local %+v and remote %+v stats differ", local, remote)
	}
	text := mustRun(t, e.cmd("stats")...)
	if !strings.Contains(text, "no_session") || !strings.Contains(text, "sessions_v4") {
		t.Fatalf("stats table:\n%s", text)
	}

	localRows := mustRun(t, "local", "sessions", "--pin-path", e.pin)
	if !strings.Contains(localRows, "carol ") || !strings.Contains(localRows, "198.51.100.10:22") {
		t.Fatalf("local sessions:\n%s", localRows)
	}
	r := run("local", "sessions", "--pin-path", e.pin+"-missing")
	if r.code != 1 || !strings.Contains(r.stderr, "run aegis-loader load first") {
		t.Fatalf("local sessions without pins: %+v", r)
	}
}

func TestWatch(t *testing.T) {
	e := newEnv(t)
	mustRun(t, e.cmd("login", "-u", "dave", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "443")...)
	out := mustRun(t, e.cmd("watch", "--interval", "100ms", "--count", "3")...)
	if n := strings.Count(out, "aegisctl watch "); n != 3 {
		t.Fatalf("%d frames, want 3:\n%s", n, out)
	}
	if strings.Count(out, "dave ") != 3 || !strings.Contains(out, "PKT/S") {
		t.Fatalf("watch output:\n%s", out)
	}
}

func TestRefusedCallsAreClear(t *testing.T) {
	e := newEnv(t)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"sessions", "--address", e.addr}, 2, "mutual TLS needs --tls-cert, --tls-key and --tls-ca"},
		{e.cmd("login", "-u", "x", "--src", "192.0.2.10", "--dst", "2001:db8::1", "--port", "1"), 1, "login: InvalidArgument: "},
		{e.cmd("login", "-u", "x", "--src", "192.0.2.10", "--dst", "198.51.100.1", "--port", "70000"), 1, "login: InvalidArgument: "},
		{e.cmd("logout", "--src", "192.0.2.10"), 2, "needs all of --src, --dst and --port"},
		{append(e.cmd("stats"), "--address", "127.0.0.1:1", "--timeout", "2s"), 1, "cannot reach the control plane at 127.0.0.1:1"},
		// The server's certificate is not a client certificate.
		{append(e.cmd("stats"), "--tls-cert", e.file("server.crt"), "--tls-key", e.file("server.key"), "--timeout", "2s"), 1, "get stats: "},
	} {
		r := run(c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("aegisctl %s: exit %d, stderr %q; want exit %d and one line with %q",
				strings.Join(c.args, " "), r.code, r.stderr, c.code, c.want)
		}
	}
	if n4, n6, _ := e.maps(t).Count(); n4+n6 != 0 {
		t.Fatalf("refused calls changed the map: %d sessions", n4+n6)
	}
}

func TestCerts(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	out := mustRun(t, "certs", "--dir", dir, "--server-name", "gw1.example.org", "--server-ip", "192.0.2.1",
		"--client", "aegis-controller", "--client", "ops")
	if !strings.Contains(out, "new CA") {
		t.Fatalf("first run: %s", out)
	}
	files := []string{"ca.crt", "ca.key", "server.crt", "server.key", "aegis-controller.crt", "aegis-controller.key", "ops.crt", "ops.key"}
	for _, f := range files {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want 0700", fi.Mode().Perm())
	}
	server := readCert(t, filepath.Join(dir, "server.crt"))
	if strings.Join(server.DNSNames, ",") != "aegis-agent,gw1.example.org" || len(server.IPAddresses) != 1 ||
		!server.IPAddresses[0].Equal(net.ParseIP("192.0.2.1")) {
		t.Fatalf("server SANs %v %v", server.DNSNames, server.IPAddresses)
	}
	if len(server.ExtKeyUsage) != 1 || server.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
		t.Fatalf("server key usage %v", server.ExtKeyUsage)
	}
	client := readCert(t, filepath.Join(dir, "aegis-controller.crt"))
	if client.Subject.CommonName != "aegis-controller" || client.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("client certificate %v %v", client.Subject, client.ExtKeyUsage)
	}
	if d := time.Until(client.NotAfter); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Fatalf("client certificate lifetime ends in %v", d)
	}
	ca := readCert(t, filepath.Join(dir, "ca.crt"))
	if err := client.CheckSignatureFrom(ca); err != nil {
		t.Fatal(err)
	}

	// A second run refuses to replace certificates, then reuses the CA.
	if r := run("certs", "--dir", dir); r.code != 1 || !strings.Contains(r.stderr, "pass --force") {
		t.Fatalf("second run without --force: %+v", r)
	}
	if out := mustRun(t, "certs", "--dir", dir, "--force"); !strings.Contains(out, "using the existing CA") {
		t.Fatalf("--force run: %s", out)
	}
	if again := readCert(t, filepath.Join(dir, "ca.crt")); !again.Equal(ca) {
		t.Fatal("the CA was replaced")
	}
	if err := readCert(t, filepath.Join(dir, "server.crt")).CheckSignatureFrom(ca); err != nil {
		t.Fatalf("new server certificate not from the kept CA: %v", err)
	}
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// The table formats are part of the operator experience: golden files.
func TestGoldenTables(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	rows := []aegisctl.SessionRow{
		{User: "bob", Protocol: "udp", Source: netip.MustParseAddr("2001:db8:1::10"),
			Dest: netip.MustParseAddrPort("[2001:db8:2::10]:53"), LastSeen: now.Add(-3 * time.Second),
			Expires: now.Add(2*time.Hour + 5*time.Minute), Left: 57 * time.Second},
		{User: "alice", Protocol: "tcp", Source: netip.MustParseAddr("192.0.2.10"),
			Dest: netip.MustParseAddrPort("198.51.100.10:8080"), LastSeen: now.Add(-75 * time.Second), Left: 0, Expired: true},
		{User: "alice", Protocol: "tcp", Source: netip.MustParseAddr("192.0.2.10"),
			Dest: netip.MustParseAddrPort("198.51.100.10:22"), LastSeen: now, Left: 26*time.Hour + 3*time.Minute},
	}
	var sessions bytes.Buffer
	if err := aegisctl.WriteSessions(&sessions, rows, now); err != nil {
		t.Fatal(err)
	}
	golden(t, "sessions.golden", sessions.String())

	var stats bytes.Buffer
	st := aegisctl.Stats{
		Counters: []aegisctl.CounterRow{{"pass", "session", 123456, 98765432}, {"pass", "controller", 7, 420}, {"drop", "no_session", 1234567890, 9}},
		Maps:     []aegisctl.MapRow{{"v4", 3, 262144}, {"v6", 0, 262144}},
	}
	if err := aegisctl.WriteStats(&stats, st); err != nil {
		t.Fatal(err)
	}
	golden(t, "stats.golden", stats.String())
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("%s differs:\n--- got\n%s--- want\n%s", name, got, want)
	}
}

// "aegisctl sessions" follows the pages: a map of more sessions than the
// largest page is listed whole, in the table and in JSON, and --limit cuts
// across pages.
func TestSessionsFollowsPages(t *testing.T) {
	e := newEnv(t)
	const n = 25000
	tu.FillSessionsV4(t, e.pin, n, "bulk", state.Now())
	table := mustRun(t, e.cmd("sessions")...)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != n+2 || lines[len(lines)-1] != fmt.Sprintf("%d session(s)", n) {
		t.Fatalf("sessions table of %d lines, ends %q", len(lines), lines[len(lines)-1])
	}
	var rows []aegisctl.SessionRow
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("sessions", "--json")...)), &rows); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range rows {
		seen[r.Source.String()+" "+r.Dest.String()] = true
	}
	if len(rows) != n || len(seen) != n {
		t.Fatalf("json: %d rows, %d distinct, want %d", len(rows), len(seen), n)
	}
	out := mustRun(t, e.cmd("sessions", "--limit", "12000")...)
	if !strings.HasSuffix(out, "12000 session(s)\n13000 more not shown (--limit)\n") {
		t.Fatalf("--limit 12000 ends %q", out[max(0, len(out)-80):])
	}
}
