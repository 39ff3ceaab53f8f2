package aegisctl_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/aegisctl"
)

func TestAddressDefaultsToTheAgentPort(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"198.51.100.1", "198.51.100.1:50001"},
		{"198.51.100.1:8443", "198.51.100.1:8443"},
		{"2001:db8::1", "[2001:db8::1]:50001"},
		{"[2001:db8::1]", "[2001:db8::1]:50001"},
		{"[2001:db8::1]:8443", "[2001:db8::1]:8443"},
		{"gw1.example.org", "gw1.example.org:50001"},
		{"gw1.example.org:8443", "gw1.example.org:8443"},
		{"localhost", "localhost:50001"},
	} {
		if got, err := aegisctl.Target(c.in); err != nil || got != c.want {
			t.Errorf("%q: %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "[2001:db8::1", "198.51.100.1:0", "198.51.100.1:http", ":50001", "[gw1]", "a:b:c:"} {
		if got, err := aegisctl.Target(bad); err == nil {
			t.Errorf("%q: %q, want an error", bad, got)
		}
	}
	// Through the real dial: the line names the address dialed.
	for _, a := range []string{"::1", "[::1]"} {
		r := run("stats", "--insecure", "--timeout", "2s", "--address", a)
		if r.code != 1 || !strings.Contains(r.stderr, "at [::1]:50001") {
			t.Errorf("--address %s: %+v", a, r)
		}
	}
}

// A shell that sourced aegis.env (AEGIS_PORT, AEGIS_USER, ...) changes
// nothing aegisctl does.
func TestDaemonVariablesDoNotReachAegisctl(t *testing.T) {
	e := newEnv(t)
	for k, v := range map[string]string{"AEGIS_PORT": "443", "AEGIS_USER": "frank", "AEGIS_FORCE": "true",
		"AEGIS_JSON": "true", "AEGIS_DIR": t.TempDir(), "AEGIS_ADDRESS": "127.0.0.1:1", "AEGISCTL_USER": "frank", "AEGISCTL_FORCE": "true"} {
		t.Setenv(k, v)
	}
	if r := run(e.cmd("login", "-u", "gina", "--src", "192.0.2.10", "--dst", "198.51.100.10")...); r.code != 2 || !strings.Contains(r.stderr, "--port") {
		t.Errorf("login without --port: %+v", r)
	}
	if r := run(e.cmd("logout")...); r.code != 2 || !strings.Contains(r.stderr, "name a --user") {
		t.Errorf("bare logout: %+v", r)
	}
	if out := mustRun(t, e.cmd("stats")...); strings.HasPrefix(out, "{") {
		t.Errorf("stats printed JSON: %s", out)
	}
	if r := run("certs", "--dir", e.dir, "init"); r.code != 1 || !strings.Contains(r.stderr, "pass --force") {
		t.Errorf("certs init over an existing CA: %+v", r)
	}
	// The names of the former scheme are not read, and said so.
	t.Setenv("AEGIS_CTL_ADDRESS", e.addr)
	if r := run("config"); r.code != 0 || r.stderr != "aegisctl: AEGIS_CTL_ADDRESS is not read any more: rename it AEGISCTL_ADDRESS\n" ||
		!strings.Contains(r.stdout, "dials localhost:50001") {
		t.Errorf("with AEGIS_CTL_ADDRESS: %+v", r)
	}
}

// profile writes a profile file for e with mode perm and returns its path.
func (e *env) profile(t *testing.T, perm os.FileMode, extra string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"aegis-controller.crt", "aegis-controller.key", "ca.crt"} {
		copyFile(t, e.file(f), filepath.Join(dir, f))
	}
	body := fmt.Sprintf(`default-profile = "gw1"

[profile.gw1]
address = %q
tls-cert = "aegis-controller.crt"
tls-key = "aegis-controller.key"
tls-ca = "ca.crt"
timeout = "5s"

[profile.down]
address = "127.0.0.1:1"
tls-cert = "aegis-controller.crt"
tls-key = "aegis-controller.key"
tls-ca = "ca.crt"
%s`, e.addr, extra)
	path := filepath.Join(dir, "aegisctl.toml")
	if err := os.WriteFile(path, []byte(body), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestProfiles(t *testing.T) {
	e := newEnv(t)
	file := e.profile(t, 0o600, "")
	mustRun(t, "login", "--config", file, "-u", "hank", "--src", "192.0.2.10", "--dst", "198.51.100.10", "--port", "22")
	if out := mustRun(t, "sessions", "--config", file); !strings.Contains(out, "hank ") {
		t.Fatalf("sessions through the default profile:\n%s", out)
	}
	unreachable := func(t *testing.T, addr string, args ...string) {
		t.Helper()
		r := run(append([]string{"stats", "--config", file}, args...)...)
		if r.code != 1 || !strings.Contains(r.stderr, "cannot reach the control plane at "+addr) {
			t.Errorf("aegisctl stats %s: %+v; want unreachable %s", strings.Join(args, " "), r, addr)
		}
	}
	// flag > environment > profile > default
	unreachable(t, "127.0.0.1:1", "--profile", "down")
	unreachable(t, "127.0.0.1:2", "--address", "127.0.0.1:2")
	t.Setenv("AEGISCTL_PROFILE", "down")
	unreachable(t, "127.0.0.1:1")
	mustRun(t, "stats", "--config", file, "--profile", "gw1")
	mustRun(t, "--config", file, "--profile", "gw1", "stats") // aegisctl's flags, before the command too
	t.Setenv("AEGISCTL_ADDRESS", "127.0.0.1:3")
	unreachable(t, "127.0.0.1:3", "--profile", "gw1")
	unreachable(t, "127.0.0.1:2", "--profile", "gw1", "--address", "127.0.0.1:2")
	out := mustRun(t, "config", "--config", file, "--profile", "gw1", "--timeout", "1s")
	for _, want := range []string{"$AEGISCTL_ADDRESS", "profile gw1 of " + file, "--timeout      1s", "dials 127.0.0.1:3"} {
		if !strings.Contains(out, want) {
			t.Errorf("config lacks %q:\n%s", want, out)
		}
	}
	var set aegisctl.Settings
	if err := json.Unmarshal([]byte(mustRun(t, "--profile", "gw1", "config", "--json", "--config", file, "--timeout", "1s")), &set); err != nil {
		t.Fatal(err)
	}
	from := map[string]aegisctl.Setting{}
	for _, s := range set.Settings {
		from[s.Name] = s
	}
	for name, want := range map[string]aegisctl.Setting{
		"config":   {Name: "config", Value: file, From: aegisctl.SourceFlag},
		"profile":  {Name: "profile", Value: "gw1", From: aegisctl.SourceFlag},
		"address":  {Name: "address", Value: "127.0.0.1:3", From: aegisctl.SourceEnvironment, Variable: "AEGISCTL_ADDRESS"},
		"tls-ca":   {Name: "tls-ca", Value: filepath.Join(filepath.Dir(file), "ca.crt"), From: aegisctl.SourceProfile, Profile: "gw1", ProfileFile: file},
		"timeout":  {Name: "timeout", Value: "1s", From: aegisctl.SourceFlag},
		"insecure": {Name: "insecure", Value: "false", From: aegisctl.SourceDefault},
	} {
		if from[name] != want {
			t.Errorf("config --json: %s is %+v, want %+v", name, from[name], want)
		}
	}
	if set.Dials != "127.0.0.1:3" {
		t.Errorf("config --json dials %q", set.Dials)
	}
	os.Unsetenv("AEGISCTL_ADDRESS")
	os.Unsetenv("AEGISCTL_PROFILE")

	for _, c := range []struct {
		name, file string
		args       []string
		want       string
	}{
		{"world-writable", e.profile(t, 0o666, ""), nil, "has mode 0666: others may write it"},
		{"group-writable", e.profile(t, 0o620, ""), nil, "has mode 0620: others may write it"},
		{"unknown key", e.profile(t, 0o600, "adress = \"x\"\n"), nil, `unknown key "adress"`},
		{"unknown profile", file, []string{"--profile", "gw2"}, `has no profile "gw2" (it has: down, gw1)`},
		{"missing file", file + ".missing", []string{"--profile", "gw1"}, "no such file"},
	} {
		r := run(append([]string{"stats", "--config", c.file}, c.args...)...)
		if r.code != 2 || !strings.Contains(r.stderr, c.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%s: %+v; want exit 2 and %q", c.name, r, c.want)
		}
	}
	// No file and no --profile: the built-in defaults.
	if out := mustRun(t, "config", "--config", file+".missing"); !strings.Contains(out, "dials localhost:50001") {
		t.Errorf("without a file:\n%s", out)
	}
}

// A profile's booleans and durations reach the flags as well as its strings.
func TestProfileInsecureAndTimeout(t *testing.T) {
	e := newEnv(t)
	plain, _ := startControlPlane(t, e.pin, nil, nil, "127.0.0.1:0")
	path := filepath.Join(t.TempDir(), "aegisctl.toml")
	body := fmt.Sprintf("[profile.lo]\naddress = %q\ninsecure = true\ntimeout = \"3s\"\n", plain)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "stats", "--config", path, "--profile", "lo")
	out := mustRun(t, "config", "--config", path, "--profile", "lo")
	for _, want := range []string{"--insecure     true", "--timeout      3s", "dials " + plain} {
		if !strings.Contains(out, want) {
			t.Errorf("config lacks %q:\n%s", want, out)
		}
	}
}
