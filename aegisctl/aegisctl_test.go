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
	"sync"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/bpf"
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
	e := &env{pin: tu.PinDir(t), dir: filepath.Join(t.TempDir(), "tls")}
	tu.PinMaps(t, e.pin, tu.PinOptions{DefaultIdleTimeout: time.Minute})
	mustRun(t, "certs", "--dir", e.dir, "init")
	mustRun(t, "certs", "--dir", e.dir, "server", "--ip", "127.0.0.1")
	mustRun(t, "certs", "--dir", e.dir, "client", "aegis-controller")

	certs, err := controlplane.LoadCertificates(e.file("server.crt"), e.file("server.key"), e.file("ca.crt"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	e.addr, _ = startControlPlane(t, e.pin, certs, nil, "127.0.0.1:0")
	return e
}

// startControlPlane serves a real control plane over the maps at pin on
// addr (mutual TLS with certs, plaintext if nil). It returns the address
// and a stop that the test may call before its cleanup does.
func startControlPlane(t *testing.T, pin string, certs *controlplane.Certificates, allowed []string, addr string) (string, func()) {
	t.Helper()
	log := zerolog.Nop()
	h := state.NewHandle(pin, state.OpenOptions{Writable: true}, log)
	t.Cleanup(func() { h.Close() })
	srv, err := controlplane.New(controlplane.Options{Maps: h, Log: log, Certificates: certs, AllowedClientNames: allowed,
		MonitorInterval: time.Second, RefreshInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { _ = srv.Serve(ln); close(served) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv.Shutdown(ctx)
			<-served
		})
	}
	t.Cleanup(stop)
	return ln.Addr().String(), stop
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

	// "local sessions" takes the same filters, applied to the maps.
	for _, tc := range []struct {
		args []string
		want []string // users, sorted
	}{
		{nil, []string{"alice", "bob"}},
		{[]string{"--user", "bob"}, []string{"bob"}},
		{[]string{"--src", "192.0.2.10"}, []string{"alice"}},
		{[]string{"--dst", "2001:db8:2::10", "--port", "53"}, []string{"bob"}},
		{[]string{"--dst", "2001:db8:2::10", "--port", "54"}, nil},
		{[]string{"-u", "alice", "--src", "2001:db8:1::10"}, nil},
	} {
		var local []aegisctl.SessionRow
		args := append([]string{"local", "sessions", "--json", "--pin-path", e.pin}, tc.args...)
		if err := json.Unmarshal([]byte(mustRun(t, args...)), &local); err != nil {
			t.Fatal(err)
		}
		var users []string
		for _, r := range local {
			users = append(users, r.User)
		}
		if strings.Join(users, ",") != strings.Join(tc.want, ",") {
			t.Errorf("local sessions %v: %v, want %v", tc.args, users, tc.want)
		}
	}
	if r := run("local", "sessions", "--pin-path", e.pin, "--src", "192.0.2"); r.code != 2 || !strings.Contains(r.stderr, "--src") {
		t.Errorf("a malformed --src: %+v", r)
	}

	// --json: the result and the session, in the fields of sessions --json.
	var g aegisctl.Grant
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("login", "--json", "-u", "alice", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "8080")...)), &g); err != nil {
		t.Fatal(err)
	}
	if g.Result != aegisctl.ResultRefreshed || g.Session.User != "alice" || g.Session.Dest != netip.MustParseAddrPort("198.51.100.10:8080") ||
		g.Session.IdleTimeout != time.Minute || g.Session.Created.IsZero() {
		t.Fatalf("login --json: %+v", g)
	}
	var lo aegisctl.Revocation
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("logout", "--json", "-u", "nobody")...)), &lo); err != nil {
		t.Fatal(err)
	}
	if lo != (aegisctl.Revocation{Result: aegisctl.ResultNotFound, User: "nobody"}) {
		t.Fatalf("logout --json of a user without sessions: %+v", lo)
	}

	if out := mustRun(t, e.cmd("logout", "--user", "alice")...); out != "revoked 1 session(s)\n" {
		t.Fatalf("logout: %q", out)
	}
	if _, err := e.maps(t).Lookup(key); err == nil {
		t.Fatal("alice's session is still in the map")
	}
	lo = aegisctl.Revocation{}
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("logout", "--json", "--src", "2001:db8:1::10", "--dst", "2001:db8:2::10", "--port", "53", "--proto", "udp")...)), &lo); err != nil {
		t.Fatal(err)
	}
	if lo != (aegisctl.Revocation{Result: aegisctl.ResultRevoked, Revoked: 1, Proto: "udp", Family: aegisctl.FamilyIPv6,
		Src: "2001:db8:1::10", Dst: "2001:db8:2::10", Dport: 53}) {
		t.Fatalf("logout --json by key: %+v", lo)
	}
	if out := mustRun(t, e.cmd("sessions", "--json")...); out != "[]\n" {
		t.Fatalf("sessions --json of none: %q, want []", out)
	}
	if n4, n6, _ := e.maps(t).Count(); n4+n6 != 0 {
		t.Fatalf("%d sessions left", n4+n6)
	}

	// An any-protocol session: one entry, shown as any.
	if out := mustRun(t, e.cmd("login", "-u", "carol", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "53", "--proto", "any")...); !strings.HasPrefix(out, "granted: carol any 192.0.2.10 -> 198.51.100.10:53") {
		t.Fatalf("login --proto any: %q", out)
	}
	anyKey := key
	anyKey.Port, anyKey.Proto = 53, state.Any
	if s, err := e.maps(t).Lookup(anyKey); err != nil || s.User != "carol" {
		t.Fatalf("any-protocol session %+v (%v)", s, err)
	}
	if err := json.Unmarshal([]byte(mustRun(t, e.cmd("sessions", "--json")...)), &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Protocol != "any" {
		t.Fatalf("json: %+v", rows)
	}
	if table := mustRun(t, e.cmd("sessions")...); !strings.Contains(table, " any ") {
		t.Fatalf("sessions table:\n%s", table)
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

	// --json: one object a line, each frame of its own time.
	out = mustRun(t, e.cmd("watch", "--json", "--interval", "100ms", "--count", "3")...)
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3:\n%s", len(lines), out)
	}
	var last time.Time
	for _, l := range lines {
		var f aegisctl.WatchFrame
		if err := json.Unmarshal([]byte(l), &f); err != nil {
			t.Fatalf("%v: %q", err, l)
		}
		if !f.Time.After(last) || f.Matched != 1 || len(f.Sessions) != 1 || f.Sessions[0].User != "dave" ||
			len(f.Counters) != len(state.Reasons) || f.Maps[0].Entries != 1 {
			t.Fatalf("frame %+v", f)
		}
		last = f.Time
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
		Maps:     []aegisctl.MapRow{{aegisctl.FamilyIPv4, 3, 262144}, {aegisctl.FamilyIPv6, 0, 262144}},
		AllowRules: []aegisctl.AllowRuleRow{{Rule: "203.0.113.0/24,tcp/443", ID: 3, Packets: 42},
			{Rule: "2001:db8::/32", ID: 0, Packets: 0}},
		AllowUnnumbered: 5,
	}
	if err := aegisctl.WriteStats(&stats, st); err != nil {
		t.Fatal(err)
	}
	golden(t, "stats.golden", stats.String())

	// JSON speaks the documented field names (docs/operations.md).
	var js bytes.Buffer
	if err := aegisctl.WriteJSON(&js, rows); err != nil {
		t.Fatal(err)
	}
	golden(t, "sessions.json.golden", js.String())
	js.Reset()
	if err := aegisctl.WriteJSON(&js, st); err != nil {
		t.Fatal(err)
	}
	golden(t, "stats.json.golden", js.String())

	for _, c := range []struct {
		name string
		v    any
	}{
		{"login.json.golden", aegisctl.Grant{Result: aegisctl.ResultCreated, Session: aegisctl.SessionRow{User: "alice", Protocol: "tcp",
			Source: netip.MustParseAddr("192.0.2.10"), Dest: netip.MustParseAddrPort("198.51.100.10:8080"), Created: now, LastSeen: now,
			Expires: now.Add(time.Hour), IdleTimeout: 5 * time.Minute, Left: 5 * time.Minute}}},
		{"logout.json.golden", aegisctl.Revocation{Result: aegisctl.ResultRevoked, Revoked: 1, User: "bob", Proto: "udp",
			Family: aegisctl.FamilyIPv6, Src: "2001:db8:1::10", Dst: "2001:db8:2::10", Dport: 53}},
		{"config.json.golden", aegisctl.Settings{Settings: []aegisctl.Setting{
			{Name: "config", Value: "/home/ops/.config/aegis/aegisctl.toml", From: aegisctl.SourceFlag},
			{Name: "profile", Value: "gw1", From: aegisctl.SourceEnvironment, Variable: "AEGISCTL_PROFILE"},
			{Name: "address", Value: "198.51.100.1", From: aegisctl.SourceProfile, Profile: "gw1", ProfileFile: "/home/ops/.config/aegis/aegisctl.toml"},
			{Name: "timeout", Value: "10s", From: aegisctl.SourceDefault},
		}, Dials: "198.51.100.1:50001"}},
	} {
		js.Reset()
		if err := aegisctl.WriteJSON(&js, c.v); err != nil {
			t.Fatal(err)
		}
		golden(t, c.name, js.String())
	}
	var frame bytes.Buffer
	if err := aegisctl.WriteJSONLine(&frame, aegisctl.WatchFrame{Time: now, Stats: st, Sessions: rows[2:], Matched: 3}); err != nil {
		t.Fatal(err)
	}
	golden(t, "watch.json.golden", frame.String())
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

// A user name in the maps that is not printable text (written by another
// tool: the control plane refuses such names) is printed escaped by every
// renderer, so it cannot add a row or rewrite the operator's terminal.
func TestHostileUserInTheMapsIsEscaped(t *testing.T) {
	e := newEnv(t)
	m, err := state.Open(e.pin, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	now := state.Now()
	hostile := map[uint16]string{
		22: "x\x1b[2J\x1b[H\nroot  tcp",
		23: "evil\u202egpj\u009b",
		24: "bad\xff\u200b",
	}
	for port, user := range hostile {
		k := bpf.AegisSessionKeyV4{Src: [4]uint8{192, 0, 2, 10}, Dst: [4]uint8{198, 51, 100, 10}, Dport: port, Proto: uint8(state.TCP)}
		v := bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now}
		for i := 0; i < len(user); i++ {
			v.User[i] = int8(user[i])
		}
		if err := m.SessionsV4.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	// Nothing a terminal would act on: no C0 control but the newlines
	// that end rows, no DEL, no C1 control, no format character.
	clean := func(what, out string) {
		t.Helper()
		for _, r := range strings.ReplaceAll(out, "\n", "") {
			if !unicode.IsPrint(r) {
				t.Errorf("%s prints %U raw:\n%s", what, r, out)
			}
		}
		if !utf8.ValidString(out) {
			t.Errorf("%s prints invalid UTF-8:\n%q", what, out)
		}
	}
	for what, args := range map[string][]string{
		"local sessions": {"local", "sessions", "--pin-path", e.pin},
		"sessions":       e.cmd("sessions"),
	} {
		out := mustRun(t, args...)
		clean(what, out)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 5 || lines[4] != "3 session(s)" {
			t.Fatalf("%s: want the header, 3 rows and the count:\n%s", what, out)
		}
		if !strings.Contains(out, `"x\x1b[2J\x1b[H\nroot  tcp"`) || !strings.Contains(out, `"evil\u202egpj\u009b"`) ||
			!strings.Contains(out, `"bad\xff\u200b"`) {
			t.Errorf("%s: the names are not shown escaped:\n%s", what, out)
		}
	}
	for what, args := range map[string][]string{
		"local sessions --json": {"local", "sessions", "--json", "--pin-path", e.pin},
		"sessions --json":       e.cmd("sessions", "--json"),
	} {
		out := mustRun(t, args...)
		clean(what, out)
		var rows []aegisctl.SessionRow
		if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 3 {
			t.Fatalf("%s: %v\n%s", what, err, out)
		}
		// Escaped, not changed: JSON carries the name a reader can act on
		// (the control plane's listing shows it as state.Escape does).
		for _, r := range rows {
			want := hostile[r.Dest.Port()]
			if what == "sessions --json" {
				want = state.Escape(want)
			} else if !utf8.ValidString(want) {
				want = strings.ToValidUTF8(want, "\ufffd")
			}
			if r.User != want {
				t.Errorf("%s: user %q, want %q", what, r.User, want)
			}
		}
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
