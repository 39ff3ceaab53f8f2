package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/pki"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
)

// buildDeb runs "make deb" for version into dir and returns the package's
// path. tags selects the build: aegis_nextbuild gives the loader the next
// release's program, so that an upgrade to it really swaps the program.
func buildDeb(dir, version, tags string) (string, error) {
	src, err := filepath.Abs("..")
	if err != nil {
		return "", err
	}
	cmd := exec.Command("make", "--no-print-directory", "deb", "VERSION="+version, "GOTAGS="+tags,
		"BIN="+filepath.Join(dir, "bin"), "DIST="+dir)
	cmd.Dir = src
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("make deb VERSION=%s: %w\n%s", version, err, out)
	}
	return filepath.Join(dir, "aegis-agent_"+version+"_"+runtime.GOARCH+".deb"), nil
}

// upperEntries lists what the container wrote into its overlay, by path,
// with "whiteout" for a deletion. Paths that change whatever a package
// does (logs, dpkg's and systemd's own state, the packages the test
// copied in) are left out; the account databases are compared by content.
func upperEntries(t *testing.T, c *container) map[string]string {
	t.Helper()
	skip := []string{"/var/log", "/var/cache", "/var/lib/dpkg", "/var/lib/systemd", "/var/tmp", "/tmp", "/run",
		"/root", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/.pwd.lock"}
	out := map[string]string{}
	err := filepath.WalkDir(c.upper, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(p, c.upper)
		for _, s := range skip {
			if rel == s || strings.HasPrefix(rel, s+"/") || strings.HasPrefix(rel, s+"-") {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		if rel == "" {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		kind := info.Mode().Type().String()
		if st, ok := info.Sys().(*syscall.Stat_t); ok && info.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 0 {
			kind = "whiteout"
		}
		out[rel] = kind
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// accounts reads the account databases of the container.
func accounts(t *testing.T, c *container) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, f := range []string{"/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"} {
		b, err := os.ReadFile(filepath.Join(c.root, f))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		out[f] = string(b)
	}
	return out
}

// sameFile reports whether a and b are regular files with the same bytes.
func sameFile(a, b string) bool {
	x, errA := os.ReadFile(a)
	y, errB := os.ReadFile(b)
	return errA == nil && errB == nil && string(x) == string(y)
}

// streamThrough runs fn while the client streams through a granted
// session to sink, and fails t if one datagram is lost or the data path
// dropped one.
func streamThrough(t *testing.T, g *gateway, sink *tu.Server, fn func()) {
	t.Helper()
	before := g.stats()
	ctx, cancel := context.WithCancel(context.Background())
	sent := make(chan uint64, 1)
	go func() {
		n, err := g.Stream(ctx, tu.ClientV4, sink.Addr, 1000)
		if err != nil {
			t.Error(err)
		}
		sent <- n
	}()
	time.Sleep(300 * time.Millisecond)
	fn()
	time.Sleep(300 * time.Millisecond)
	cancel()
	n := <-sent
	got := sink.WaitReceived(n, 3*time.Second)
	t.Logf("%d of %d datagrams arrived", got, n)
	if n < 300 || got != n {
		t.Fatalf("lost %d of %d datagrams", n-got, n)
	}
	after := g.stats()
	for _, r := range []bpf.Reason{bpf.ReasonNoSession, bpf.ReasonExpired} {
		if d := after[r].Packets - before[r].Packets; d != 0 {
			t.Fatalf("%d packets dropped as %v", d, r)
		}
	}
}

// xdpAttached reports whether the gateway's public interface has an XDP
// program.
func xdpAttached(t *testing.T, g *gateway) bool {
	t.Helper()
	return strings.Contains(g.Gateway.Run(t, "ip", "link", "show", tu.PublicIface), " xdp")
}

// The Debian package under real systemd: installed on a clean root it
// creates the user and enables and starts nothing; configured, it filters;
// upgraded with traffic flowing, it swaps the program in place without
// losing a packet or a session; removed, it stops the daemons and leaves
// the filter attached (fail closed); purged, it detaches the filter and
// leaves nothing behind.
func TestDeb(t *testing.T) {
	tu.RequireKernel(t)
	for _, tool := range []string{"dpkg-deb", "systemd-nspawn"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv(tu.RequireKernelEnv) == "1" {
				t.Fatalf("%s not installed (make setup installs it)", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	const v1, v2 = "1.0.0", "1.0.0+1"
	type built struct {
		path string
		err  error
	}
	builds := map[string]chan built{v1: make(chan built, 1), v2: make(chan built, 1)}
	dir := t.TempDir()
	for v, tags := range map[string]string{v1: "", v2: "aegis_nextbuild"} {
		go func() {
			p, err := buildDeb(filepath.Join(dir, v), v, tags)
			builds[v] <- built{p, err}
		}()
	}

	// postinst applies the package's tmpfiles.d, which sets the mode of
	// /sys/fs/bpf: the container shares the host's bpffs.
	bpffs, err := os.Stat(tu.BPFFSRoot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(tu.BPFFSRoot, bpffs.Mode()&(fs.ModePerm|fs.ModeSticky)) })

	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	c := bootContainer(t, g)
	debs := map[string]string{}
	for _, v := range []string{v1, v2} {
		b := <-builds[v]
		if b.err != nil {
			t.Fatal(b.err)
		}
		data, err := os.ReadFile(b.path)
		if err != nil {
			t.Fatal(err)
		}
		debs[v] = "/root/" + filepath.Base(b.path)
		if err := os.WriteFile(filepath.Join(c.root, debs[v]), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	lint := make(chan string, 1)
	go func() {
		out, err := exec.Command("lintian", "--pedantic", "--info", "--fail-on", "error,warning,info,pedantic",
			filepath.Join(dir, v1, filepath.Base(debs[v1]))).CombinedOutput()
		if err != nil {
			lint <- fmt.Sprintf("%v\n%s", err, out)
		}
		close(lint)
	}()

	// Container images ship a policy-rc.d that exits 101: no service
	// actions in maintainer scripts, and the scripts obey it. A gateway
	// has none; take the one the booted root may have.
	if err := os.Remove(filepath.Join(c.root, "usr/sbin/policy-rc.d")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	before := upperEntries(t, c)
	beforeAccounts := accounts(t, c)
	units, err := filepath.Glob("../deploy/systemd/*")
	if err != nil || len(units) == 0 {
		t.Fatalf("no units in deploy/systemd (%v)", err)
	}
	for i, u := range units {
		units[i] = filepath.Base(u)
	}

	c.run("dpkg", "-i", debs[v1])

	t.Run("install: files, modes, owners", func(t *testing.T) {
		gid, err := strconv.Atoi(strings.Split(strings.TrimSpace(c.run("getent", "group", "aegis")), ":")[2])
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]struct {
			mode fs.FileMode
			gid  int
		}{
			"/etc/aegis":                                         {fs.ModeDir | 0o750, gid},
			"/etc/aegis/tls":                                     {fs.ModeDir | 0o700, 0},
			"/etc/aegis/aegis.env":                               {0o640, gid},
			"/usr/share/man/man8/aegis-loader.8.gz":              {0o644, 0},
			"/usr/share/man/man8/aegis-controlplane.8.gz":        {0o644, 0},
			"/usr/share/man/man8/aegis-reaper.8.gz":              {0o644, 0},
			"/usr/share/man/man1/aegisctl.1.gz":                  {0o644, 0},
			"/usr/share/doc/aegis-agent/copyright":               {0o644, 0},
			"/usr/share/doc/aegis-agent/changelog.gz":            {0o644, 0},
			"/usr/share/bash-completion/completions/aegisctl":    {0o644, 0},
			"/usr/share/zsh/vendor-completions/_aegisctl":        {0o644, 0},
			"/usr/share/fish/vendor_completions.d/aegisctl.fish": {0o644, 0},
		}
		for _, e := range []string{"prometheus/aegis.rules.yml", "grafana/aegis.json"} {
			want["/usr/share/doc/aegis-agent/examples/"+e] = struct {
				mode fs.FileMode
				gid  int
			}{0o644, 0}
			if !sameFile(filepath.Join(c.root, "usr/share/doc/aegis-agent/examples", e), filepath.Join("../deploy", e)) {
				t.Errorf("examples/%s is not deploy/%s", e, e)
			}
		}
		for _, b := range []string{"aegis-loader", "aegis-controlplane", "aegis-reaper", "aegisctl"} {
			want["/usr/bin/"+b] = struct {
				mode fs.FileMode
				gid  int
			}{0o755, 0}
		}
		for _, d := range []struct{ src, dst string }{
			{"../deploy/systemd/*", "/usr/lib/systemd/system/"},
			{"../deploy/sysusers.d/*", "/usr/lib/sysusers.d/"},
			{"../deploy/tmpfiles.d/*", "/usr/lib/tmpfiles.d/"},
		} {
			files, _ := filepath.Glob(d.src)
			for _, f := range files {
				want[d.dst+filepath.Base(f)] = struct {
					mode fs.FileMode
					gid  int
				}{0o644, 0}
			}
		}
		paths := make([]string, 0, len(want))
		for p := range want {
			paths = append(paths, p)
		}
		sort.Strings(paths)
		for _, p := range paths {
			info, err := os.Lstat(filepath.Join(c.root, p))
			if err != nil {
				t.Errorf("%s: %v", p, err)
				continue
			}
			st := info.Sys().(*syscall.Stat_t)
			if info.Mode() != want[p].mode || st.Uid != 0 || int(st.Gid) != want[p].gid {
				t.Errorf("%s: %v %d:%d, want %v 0:%d", p, info.Mode(), st.Uid, st.Gid, want[p].mode, want[p].gid)
			}
		}
		for _, u := range units {
			b, err := os.ReadFile(filepath.Join(c.root, "usr/lib/systemd/system", u))
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(b), "@BINDIR@") || strings.Contains(string(b), "Exec") && !strings.Contains(string(b), "=/usr/bin/aegis-") {
				t.Errorf("%s: binaries not at /usr/bin:\n%s", u, b)
			}
			// Every page a unit names is one the package installs.
			for _, line := range strings.Split(string(b), "\n") {
				docs, ok := strings.CutPrefix(line, "Documentation=")
				if !ok {
					continue
				}
				for _, d := range strings.Fields(docs) {
					var p string
					switch {
					case strings.HasPrefix(d, "file:"):
						p = strings.TrimPrefix(d, "file:")
					case strings.HasPrefix(d, "man:aegis"):
						name, sec, _ := strings.Cut(strings.TrimSuffix(strings.TrimPrefix(d, "man:"), ")"), "(")
						p = fmt.Sprintf("/usr/share/man/man%s/%s.%s.gz", sec, name, sec)
					default:
						continue
					}
					if _, err := os.Stat(filepath.Join(c.root, p)); err != nil {
						t.Errorf("%s: Documentation=%s: %v", u, d, err)
					}
				}
			}
			if !strings.Contains(string(b), "Documentation=man:aegis") {
				t.Errorf("%s names no man page of the package", u)
			}
		}
		if out := c.run("dpkg-query", "-W", "-f", "${Conffiles}", "aegis-agent"); !strings.Contains(out, "/etc/aegis/aegis.env ") {
			t.Errorf("aegis.env is not a conffile: %q", out)
		}
		if out := c.run("getent", "passwd", "aegis"); !strings.Contains(out, "nologin") {
			t.Errorf("aegis user: %q, want a system user without a login shell", out)
		}
	})

	t.Run("install: nothing enabled, nothing started, nothing attached", func(t *testing.T) {
		for _, u := range units {
			if s := c.prop(u, "ActiveState"); s != "inactive" {
				t.Errorf("%s is %s after installation", u, s)
			}
			if s := c.prop(u, "UnitFileState"); s != "disabled" {
				t.Errorf("%s is %s after installation, want disabled", u, s)
			}
		}
		if xdpAttached(t, g) {
			t.Error("an XDP program is attached after installation")
		}
		if _, err := os.Stat(g.pin); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("pin directory after installation: %v", err)
		}
	})

	// Configure, as the admin does: the interface, the controller, the
	// certificates (from internal/pki, not aegisctl certs, so that the
	// test does not depend on that command's flags).
	env := fmt.Sprintf("AEGIS_IFACE=%s\nAEGIS_IP=%s\nAEGIS_PIN_PATH=%s\nAEGIS_ALLOWED_CLIENT_NAME=aegis-controller\nAEGIS_LOG_FORMAT=json\n",
		tu.PublicIface, tu.ControllerV4, g.pin)
	if err := os.WriteFile(filepath.Join(c.root, "etc/aegis/aegis.env"), []byte(env), 0o640); err != nil {
		t.Fatal(err)
	}
	tlsDir := filepath.Join(c.root, "etc/aegis/tls")
	ca, err := pki.NewCA("Aegis Agent CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.IssueServer(pki.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	client, err := ca.IssueClient("aegis-controller", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		p    *pki.Pair
		name string
	}{{&ca.Pair, "ca"}, {server, "server"}, {client, "aegis-controller"}} {
		if err := w.p.WriteFiles(filepath.Join(tlsDir, w.name+".crt"), filepath.Join(tlsDir, w.name+".key")); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := c.cmd("systemctl", "enable", "--now", "aegis-loader.service").CombinedOutput(); err != nil {
		t.Fatalf("systemctl enable --now aegis-loader: %v\n%s\n%s", err, out,
			c.out("journalctl", "--no-pager", "-n", "40", "-u", "aegis-loader.service"))
	}
	daemons := []string{"aegis-controlplane.service", "aegis-reaper.service"}
	for _, u := range append([]string{"aegis-loader.service", "aegis-controlplane.socket"}, daemons...) {
		c.waitActive(u, 20*time.Second)
	}

	// The operator's tool, over gRPC with mutual TLS, from the gateway,
	// with the connection in root's profile file rather than in flags.
	profile := filepath.Join(c.root, "root/.config/aegis/aegisctl.toml")
	if err := os.MkdirAll(filepath.Dir(profile), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(profile, []byte(`[profile.gw]
address = "127.0.0.1:50001"
tls-cert = "/etc/aegis/tls/aegis-controller.crt"
tls-key = "/etc/aegis/tls/aegis-controller.key"
tls-ca = "/etc/aegis/tls/ca.crt"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	var login struct {
		Result, User, Src, Dst, Proto string
		Dport                         uint16
	}
	out := c.run("env", "HOME=/root", "/usr/bin/aegisctl", "--profile", "gw", "login", "--json", "--user", "alice",
		"--src", tu.ClientV4.String(), "--dst", tu.ServiceAV4.String(), "--port", "7000", "--proto", "udp")
	if err := json.Unmarshal([]byte(out), &login); err != nil || login.Result != "created" || login.User != "alice" ||
		login.Src != tu.ClientV4.String() || login.Dst != tu.ServiceAV4.String() || login.Dport != 7000 || login.Proto != "udp" {
		t.Fatalf("aegisctl --profile gw login --json: %+v (%v)\n%s", login, err, out)
	}
	sink := g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 7000))
	svc := netip.AddrPortFrom(tu.ServiceBV4, 8080)
	g.Serve(t, svc)
	g.expectPass("alice's session", bpf.ReasonSession, func() error {
		return g.UDP(tu.ClientV4, sink.Addr, probeTimeout)
	})
	g.expectBlocked("TCP without a session", bpf.ReasonNoSession, func() error {
		return g.TCP(tu.ClientV4, svc, probeTimeout)
	})

	status := func() loader.Status {
		t.Helper()
		var st loader.Status
		out := c.run("/usr/bin/aegis-loader", "status", "--json", "--pin-path", g.pin)
		if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Interfaces) != 1 {
			t.Fatalf("aegis-loader status: %v\n%s", err, out)
		}
		return st
	}

	t.Run("upgrade with traffic flowing: no packet lost, sessions kept, program swapped", func(t *testing.T) {
		old := status().Interfaces[0]
		pids := map[string]int{}
		for _, u := range daemons {
			pids[u] = c.mainPID(u)
		}
		streamThrough(t, g, sink, func() { c.run("dpkg", "-i", debs[v2]) })
		if v := c.run("dpkg-query", "-W", "-f", "${Version}", "aegis-agent"); v != v2 {
			t.Errorf("installed version %q, want %q", v, v2)
		}
		now := status().Interfaces[0]
		if now.Tag == old.Tag || now.LinkID != old.LinkID || !now.Attached {
			t.Errorf("program %s link %d before, %s link %d (attached %v) after: want the new program on the same link",
				old.Tag, old.LinkID, now.Tag, now.LinkID, now.Attached)
		}
		if !strings.Contains(c.out("journalctl", "--no-pager", "-u", "aegis-loader.service"), "upgraded program in place") {
			t.Error("the loader's journal does not show the in-place upgrade")
		}
		for _, u := range daemons {
			c.waitNewPID(u, pids[u], 20*time.Second)
		}
		if !strings.Contains(c.run("/usr/bin/aegisctl", "local", "sessions", "--pin-path", g.pin), "alice ") {
			t.Error("alice's session is gone after the upgrade")
		}
		if b, _ := os.ReadFile(filepath.Join(c.root, "etc/aegis/aegis.env")); string(b) != env {
			t.Errorf("the upgrade changed the configured aegis.env:\n%s", b)
		}
	})

	t.Run("remove: daemons stopped, filter attached with its sessions", func(t *testing.T) {
		c.run("dpkg", "-r", "aegis-agent")
		for _, u := range units {
			if s := c.prop(u, "ActiveState"); s != "inactive" {
				t.Errorf("%s is %s after dpkg -r", u, s)
			}
		}
		if out, err := c.cmd("pgrep", "-l", "aegis").CombinedOutput(); err == nil {
			t.Errorf("processes still running after dpkg -r:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(c.root, "usr/bin/aegis-loader")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("aegis-loader after dpkg -r: %v", err)
		}
		if !xdpAttached(t, g) {
			t.Fatal("the filter was detached by dpkg -r")
		}
		streamThrough(t, g, sink, func() {})
		g.expectBlocked("TCP without a session after dpkg -r", bpf.ReasonNoSession, func() error {
			return g.TCP(tu.ClientV4, svc, probeTimeout)
		})
		if _, err := os.Stat(filepath.Join(c.root, "etc/aegis/aegis.env")); err != nil {
			t.Errorf("the configuration went with dpkg -r: %v", err)
		}
	})

	t.Run("purge: filter detached, nothing left behind", func(t *testing.T) {
		c.run("dpkg", "-P", "aegis-agent")
		if _, err := os.Stat(g.pin); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("pin directory after dpkg -P: %v", err)
		}
		if xdpAttached(t, g) {
			t.Error("an XDP program is still attached after dpkg -P")
		}
		// Detached means open: the gateway forwards without a session.
		if err := g.TCP(tu.ClientV4, svc, 2*time.Second); err != nil {
			t.Errorf("TCP without a session after dpkg -P: %v, want it forwarded", err)
		}
		for _, cmd := range [][]string{{"getent", "passwd", "aegis"}, {"getent", "group", "aegis"}} {
			if out, err := c.cmd(cmd...).CombinedOutput(); err == nil {
				t.Errorf("%s after dpkg -P: %s", strings.Join(cmd, " "), out)
			}
		}
		if a := accounts(t, c); fmt.Sprint(a) != fmt.Sprint(beforeAccounts) {
			t.Errorf("account databases differ from before the installation:\nbefore %q\nafter  %q", beforeAccounts, a)
		}
		if out := c.out("dpkg-query", "-W", "-f", "${db:Status-Status}", "aegis-agent"); strings.TrimSpace(out) != "not-installed" &&
			!strings.Contains(out, "no packages found") {
			t.Errorf("dpkg status after dpkg -P: %q", out)
		}
		after := upperEntries(t, c)
		var left []string
		for p, kind := range after {
			if kind == "whiteout" || before[p] == kind {
				continue
			}
			// The state of services of the image that were running
			// before the installation (a database, a metrics store).
			if parts := strings.SplitN(p, "/", 5); len(parts) == 5 && parts[1] == "var" && parts[2] == "lib" &&
				before["/var/lib/"+parts[3]] != "" {
				continue
			}
			// A directory that exists below the overlay was copied up,
			// not created; a file rewritten as it was (userdel rewrites
			// /etc/subuid) is not a change.
			if info, err := os.Lstat(p); err == nil && info.IsDir() && kind == fs.ModeDir.String() {
				continue
			}
			if kind == fs.FileMode(0).String() && sameFile(p, filepath.Join(c.upper, p)) {
				continue
			}
			left = append(left, p+" ("+kind+")")
		}
		sort.Strings(left)
		if len(left) > 0 {
			t.Errorf("left behind after dpkg -P:\n%s", strings.Join(left, "\n"))
		}
		for _, p := range []string{"/etc/aegis", "/var/lib/aegis-agent", "/etc/systemd/system/multi-user.target.wants/aegis-loader.service"} {
			if _, err := os.Lstat(filepath.Join(c.root, p)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s after dpkg -P: %v", p, err)
			}
		}
	})

	t.Run("lintian", func(t *testing.T) {
		if _, err := exec.LookPath("lintian"); err != nil {
			if os.Getenv(tu.RequireKernelEnv) == "1" {
				t.Fatal("lintian not installed (make setup installs it)")
			}
			t.Skip("lintian not installed")
		}
		if out, ok := <-lint; ok {
			t.Errorf("lintian: %s", out)
		}
	})
}
