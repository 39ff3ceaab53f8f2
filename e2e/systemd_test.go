package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/guard"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// container is real systemd booted with systemd-nspawn over a throw-away
// overlay of the host's root filesystem, in the gateway's network
// namespace, with the host's bpffs and this source tree bound in.
type container struct {
	t      *testing.T
	root   string // the overlay, as the host sees it
	upper  string // the overlay's upper layer: every file the container changed
	nspawn *exec.Cmd
	leader int // the container's PID 1, in the host's PID namespace
	log    *tu.Buffer
}

func bootContainer(t *testing.T, g *gateway) *container {
	t.Helper()
	if _, err := exec.LookPath("systemd-nspawn"); err != nil {
		if os.Getenv(tu.RequireKernelEnv) == "1" {
			t.Fatal("systemd-nspawn not installed (Debian package systemd-container; make setup installs it)")
		}
		t.Skip("systemd-nspawn not installed")
	}
	src, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	c := &container{t: t, root: filepath.Join(base, "root"), upper: filepath.Join(base, "tmp", "upper"), log: &tu.Buffer{}}
	for _, d := range []string{"tmp", "root"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The overlay's upper layer lives on a tmpfs: the container can write
	// anywhere and the host's root stays untouched (systemd's boot-time
	// cleanup would otherwise wipe the host's /tmp).
	tu.MustRun(t, "mount", "-t", "tmpfs", "tmpfs", filepath.Join(base, "tmp"))
	t.Cleanup(func() { _ = exec.Command("umount", "-l", filepath.Join(base, "tmp")).Run() })
	for _, d := range []string{"upper", "work"} {
		if err := os.Mkdir(filepath.Join(base, "tmp", d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tu.MustRun(t, "mount", "-t", "overlay", "overlay", "-o",
		fmt.Sprintf("lowerdir=/,upperdir=%s/tmp/upper,workdir=%s/tmp/work", base, base), c.root)
	t.Cleanup(func() { _ = exec.Command("umount", "-l", c.root).Run() })

	name := tu.RandomName("aegis-sd-")
	// nspawn gives containers a syscall allowlist without bpf(2).
	c.nspawn = exec.Command("systemd-nspawn", "-D", c.root, "--capability=all", "--system-call-filter=bpf",
		"--network-namespace-path="+g.Gateway.Path(), "-b", "--console=passive", "--register=no",
		"--keep-unit", "--link-journal=no", "--bind=/sys/fs/bpf", "--bind="+src+":/opt/aegis", "-M", name)
	c.nspawn.Stdout, c.nspawn.Stderr = c.log, c.log
	if err := c.nspawn.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stop)

	deadline := time.Now().Add(30 * time.Second)
	for c.leader == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the container did not start:\n%s", c.log.String())
		}
		out, _ := exec.Command("pgrep", "-P", strconv.Itoa(c.nspawn.Process.Pid)).Output()
		if pid, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil {
			c.leader = pid
		}
		time.Sleep(50 * time.Millisecond)
	}
	state := ""
	for time.Now().Before(deadline) {
		state = strings.TrimSpace(c.out("systemctl", "is-system-running"))
		if state == "running" || state == "degraded" {
			return c
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("systemd in the container did not finish booting (%s):\n%s", state, c.log.String())
	return nil
}

func (c *container) stop() {
	if c.nspawn.Process == nil {
		return
	}
	// SIGTERM asks nspawn to shut the container down; killing the
	// container's PID 1 ends every process in its PID namespace.
	_ = c.nspawn.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.nspawn.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		if c.leader != 0 {
			_ = syscall.Kill(c.leader, syscall.SIGKILL)
		}
		_ = c.nspawn.Process.Kill()
		<-done
	}
}

// cmd runs a command inside the container (all its namespaces).
func (c *container) cmd(args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"-t", strconv.Itoa(c.leader), "-a", "--"}, args...)...)
}

// out runs a command in the container and returns its output, ignoring
// its exit status.
func (c *container) out(args ...string) string {
	out, _ := c.cmd(args...).CombinedOutput()
	return string(out)
}

// run runs a command in the container and fails t on error.
func (c *container) run(args ...string) string {
	c.t.Helper()
	out, err := c.cmd(args...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("in the container: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// prop reads one property of a unit.
func (c *container) prop(unit, name string) string {
	return strings.TrimSpace(c.out("systemctl", "show", "-p", name, "--value", unit))
}

func (c *container) waitActive(unit string, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for c.prop(unit, "ActiveState") != "active" {
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not active: %s\n%s", unit, c.prop(unit, "ActiveState"),
				c.out("journalctl", "--no-pager", "-n", "30", "-u", unit))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *container) mainPID(unit string) int {
	pid, _ := strconv.Atoi(c.prop(unit, "MainPID"))
	return pid
}

// waitNewPID waits until unit runs with a main PID other than old.
func (c *container) waitNewPID(unit string, old int, timeout time.Duration) int {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if pid := c.mainPID(unit); pid != 0 && pid != old && c.prop(unit, "ActiveState") == "active" {
			return pid
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s was not restarted (main PID still %d, %s)", unit, old, c.prop(unit, "ActiveState"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// controllerClient dials the control plane through the socket unit as the
// Aegis controller does.
func controllerClient(t *testing.T, tlsDir string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(tlsDir, "aegis-controller.crt"), filepath.Join(tlsDir, "aegis-controller.key"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(tlsDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	return &tls.Config{ServerName: "aegis-agent", RootCAs: roots, Certificates: []tls.Certificate{cert}}
}

// login grants a session with a fresh connection from the private side,
// where the controller is. gRPC dials from goroutines of its own, so the
// dialer enters the namespace itself.
func login(g *gateway, cfg *tls.Config, req *agentv1.LoginEventRequest) error {
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		var c net.Conn
		err := g.Private.Do(func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			return err
		})
		return c, err
	}
	conn, err := grpc.NewClient("passthrough:///198.51.100.1:50001",
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)), grpc.WithContextDialer(dial))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = agentv1.NewAgentServiceClient(conn).LoginEvent(ctx, req)
	return err
}

// The unit trio under real systemd: installed with make install, started
// in order, least privilege, restarts and upgrades without losing a packet
// of an established session, stop semantics, crash and watchdog restarts.
func TestSystemdUnits(t *testing.T) {
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	c := bootContainer(t, g)

	// Install as an operator would, then configure.
	c.run("env", "PATH=/usr/local/go/bin:/usr/bin:/bin", "GOFLAGS=-buildvcs=false", "make", "-C", "/opt/aegis", "install")
	c.run("systemd-sysusers")

	// The shipped aegis.env names no interface and no controller: the
	// loader refuses to start, says why, and is not restarted in a loop.
	// (The pin path is pointed at the test's, in case it loaded anyway.)
	envPath := filepath.Join(c.root, "etc/aegis/aegis.env")
	shipped, err := os.ReadFile(envPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(envPath, append(shipped, []byte("AEGIS_PIN_PATH="+g.pin+"\n")...), 0o640); err != nil {
		t.Fatal(err)
	}
	c.run("systemctl", "daemon-reload")
	if out, err := c.cmd("systemctl", "start", "aegis-loader.service").CombinedOutput(); err == nil {
		t.Fatalf("the loader started with the shipped aegis.env:\n%s", out)
	}
	time.Sleep(3 * time.Second) // past RestartSec: a restart would show
	journal := c.out("journalctl", "--no-pager", "-u", "aegis-loader.service")
	if !strings.Contains(journal, "refusing the built-in --iface eth0 (AEGIS_IFACE) and --ip 172.21.0.5 (AEGIS_IP)") {
		t.Fatalf("the journal does not say what to set:\n%s", journal)
	}
	if n := c.prop("aegis-loader.service", "NRestarts"); n != "0" {
		t.Fatalf("the loader was restarted %s times on a configuration error", n)
	}
	if _, err := os.Stat(g.pin); err == nil {
		t.Fatal("the refused loader created the pin directory")
	}
	c.run("systemctl", "reset-failed", "aegis-loader.service")

	env := fmt.Sprintf("AEGIS_IFACE=%s\nAEGIS_IP=%s\nAEGIS_PIN_PATH=%s\nAEGIS_ALLOWED_CLIENT_NAME=aegis-controller\nAEGIS_LOG_FORMAT=json\n",
		tu.PublicIface, tu.ControllerV4, g.pin)
	if err := os.WriteFile(filepath.Join(c.root, "etc/aegis/aegis.env"), []byte(env), 0o640); err != nil {
		t.Fatal(err)
	}
	c.run("/usr/local/bin/aegisctl", "certs", "init")
	c.run("/usr/local/bin/aegisctl", "certs", "server", "--ip", "198.51.100.1")
	c.run("/usr/local/bin/aegisctl", "certs", "client", "aegis-controller")
	tlsDir := filepath.Join(c.root, "etc/aegis/tls")
	// The watchdog test hook: a short WatchdogSec for the reaper.
	dropin := filepath.Join(c.root, "etc/systemd/system/aegis-reaper.service.d")
	if err := os.MkdirAll(dropin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dropin, "watchdog.conf"), []byte("[Service]\nWatchdogSec=2s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.run("systemctl", "daemon-reload")

	units := []string{"aegis-loader.service", "aegis-controlplane.service", "aegis-controlplane.socket", "aegis-reaper.service",
		"aegis-watch.service"}
	t.Run("systemd-analyze verify", func(t *testing.T) {
		for _, u := range units {
			out, err := c.cmd("systemd-analyze", "verify", "/usr/local/lib/systemd/system/"+u).CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "" {
				t.Errorf("%s: %v\n%s", u, err, out)
			}
		}
	})
	t.Run("systemd-analyze security", func(t *testing.T) {
		for _, u := range []string{"aegis-controlplane.service", "aegis-reaper.service"} {
			out := c.out("systemd-analyze", "security", "--no-pager", u)
			i := strings.LastIndex(out, "exposure level for "+u+": ")
			if i < 0 {
				t.Fatalf("%s: no exposure score:\n%s", u, out)
			}
			score, err := strconv.ParseFloat(strings.Fields(out[i+len("exposure level for "+u+": "):])[0], 64)
			if err != nil || score > 2.0 {
				t.Errorf("%s: exposure %v (%v), want at most 2.0", u, score, err)
			}
			t.Logf("%s: exposure %.1f", u, score)
		}
		// Root with two capabilities: reported, bounded by the loader's.
		for _, u := range []string{"aegis-loader.service", "aegis-watch.service"} {
			out := c.out("systemd-analyze", "security", "--no-pager", u)
			i := strings.LastIndex(out, "exposure level for "+u+": ")
			if i < 0 {
				t.Fatalf("%s: no exposure score:\n%s", u, out)
			}
			score := strings.Fields(out[i+len("exposure level for "+u+": "):])[0]
			if f, err := strconv.ParseFloat(score, 64); u == "aegis-watch.service" && (err != nil || f > 2.0) {
				t.Errorf("%s: exposure %s, want at most 2.0", u, score)
			}
			t.Logf("%s: exposure %s", u, score)
		}
	})

	if out, err := c.cmd("systemctl", "enable", "--now", "aegis-loader.service").CombinedOutput(); err != nil {
		t.Fatalf("systemctl enable --now aegis-loader: %v\n%s\n%s", err, out,
			c.out("journalctl", "--no-pager", "-n", "40", "-u", "aegis-loader.service"))
	}
	for _, u := range units {
		c.waitActive(u, 20*time.Second)
	}

	t.Run("start order", func(t *testing.T) {
		loaderUp, _ := strconv.ParseUint(c.prop("aegis-loader.service", "ActiveEnterTimestampMonotonic"), 10, 64)
		for _, u := range []string{"aegis-controlplane.service", "aegis-reaper.service", "aegis-watch.service"} {
			started, _ := strconv.ParseUint(c.prop(u, "ExecMainStartTimestampMonotonic"), 10, 64)
			if loaderUp == 0 || started < loaderUp {
				t.Errorf("%s started at %d, before the loader was up at %d", u, started, loaderUp)
			}
		}
	})

	t.Run("daemons run as aegis with only CAP_BPF", func(t *testing.T) {
		uid := strings.TrimSpace(c.run("id", "-u", "aegis"))
		for _, u := range []string{"aegis-controlplane.service", "aegis-reaper.service"} {
			status := c.run("cat", fmt.Sprintf("/proc/%d/status", c.mainPID(u)))
			fields := map[string]string{}
			for _, line := range strings.Split(status, "\n") {
				if k, v, ok := strings.Cut(line, ":"); ok {
					fields[k] = strings.TrimSpace(v)
				}
			}
			if f := strings.Fields(fields["Uid"]); len(f) != 4 || f[0] != uid || f[1] != uid || f[2] != uid || f[3] != uid {
				t.Errorf("%s: Uid %q, want aegis (%s) throughout", u, fields["Uid"], uid)
			}
			for _, set := range []string{"CapEff", "CapPrm", "CapBnd", "CapAmb"} {
				if fields[set] != "0000008000000000" {
					t.Errorf("%s: %s %s, want CAP_BPF only", u, set, fields[set])
				}
			}
		}
	})

	t.Run("watcher runs as root with CAP_BPF and CAP_NET_ADMIN only", func(t *testing.T) {
		status := c.run("cat", fmt.Sprintf("/proc/%d/status", c.mainPID("aegis-watch.service")))
		for _, line := range strings.Split(status, "\n") {
			k, v, _ := strings.Cut(line, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "Uid":
				if f := strings.Fields(v); len(f) != 4 || f[0] != "0" {
					t.Errorf("Uid %q, want root", v)
				}
			case "CapEff", "CapPrm", "CapBnd":
				if v != "0000008000001000" { // CAP_BPF (39), CAP_NET_ADMIN (12)
					t.Errorf("%s %s, want CAP_BPF and CAP_NET_ADMIN only", k, v)
				}
			}
		}
	})

	cfg := controllerClient(t, tlsDir)
	sink := g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 7000))
	if err := login(g, cfg, &agentv1.LoginEventRequest{User: "alice", SrcIp: tu.ClientV4.String(),
		DstIp: tu.ServiceAV4.String(), DstPort: 7000, Protocol: agentv1.Protocol_PROTOCOL_UDP}); err != nil {
		t.Fatalf("login through the socket: %v\n%s\n%s\n%s", err, c.out("ss", "-ltnp"), g.Gateway.Run(t, "ss", "-ltn"),
			c.out("journalctl", "--no-pager", "-n", "20", "-u", "aegis-controlplane.service"))
	}

	// stream runs fn while the client streams through alice's session and
	// fails t if one datagram is lost or dropped by the data path.
	stream := func(t *testing.T, fn func()) {
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
		time.Sleep(500 * time.Millisecond)
		fn()
		time.Sleep(500 * time.Millisecond)
		cancel()
		n := <-sent
		got := sink.WaitReceived(n, 3*time.Second)
		t.Logf("%d of %d datagrams arrived", got, n)
		if n < 500 || got != n {
			t.Fatalf("lost %d of %d datagrams", n-got, n)
		}
		after := g.stats()
		for _, r := range []bpf.Reason{bpf.ReasonNoSession, bpf.ReasonExpired} {
			if d := after[r].Packets - before[r].Packets; d != 0 {
				t.Fatalf("%d packets dropped as %v", d, r)
			}
		}
	}

	t.Run("restart control plane: no packet lost, no connection refused", func(t *testing.T) {
		old := c.mainPID("aegis-controlplane.service")
		stop := make(chan struct{})
		type loop struct{ calls, failed, refused int }
		res := make(chan loop, 1)
		go func() {
			var l loop
			for {
				select {
				case <-stop:
					res <- l
					return
				default:
				}
				l.calls++
				err := login(g, cfg, &agentv1.LoginEventRequest{User: "bob", SrcIp: tu.OtherClientV4.String(),
					DstIp: tu.ServiceBV4.String(), DstPort: 22})
				if err != nil {
					l.failed++
					if errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(err.Error(), "connection refused") {
						l.refused++
					}
					t.Logf("LoginEvent during the restart: %v", err)
				}
			}
		}()
		stream(t, func() {
			c.run("systemctl", "restart", "aegis-controlplane.service")
			c.waitNewPID("aegis-controlplane.service", old, 20*time.Second)
		})
		close(stop)
		l := <-res
		t.Logf("%d LoginEvent calls across the restart, %d failed", l.calls, l.failed)
		if l.refused != 0 || l.failed != 0 || l.calls < 5 {
			t.Fatalf("%d of %d calls failed (%d refused)", l.failed, l.calls, l.refused)
		}
		if !strings.Contains(c.run("/usr/local/bin/aegisctl", "local", "sessions", "--pin-path", g.pin), "alice ") {
			t.Fatal("alice's session is gone after the restart")
		}
	})

	t.Run("reload the loader with a rebuilt program: no packet lost", func(t *testing.T) {
		before := c.run("/usr/local/bin/aegis-loader", "status", "--json", "--pin-path", g.pin)
		next, err := os.ReadFile(bin("aegis-loader-next"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(c.root, "usr/local/bin/aegis-loader.new"), next, 0o755); err != nil {
			t.Fatal(err)
		}
		c.run("mv", "/usr/local/bin/aegis-loader.new", "/usr/local/bin/aegis-loader")
		stream(t, func() { c.run("systemctl", "reload", "aegis-loader.service") })
		after := c.run("/usr/local/bin/aegis-loader", "status", "--json", "--pin-path", g.pin)
		tag := func(s string) string { i := strings.Index(s, `"tag": "`); return s[i+8 : i+24] }
		if tag(before) == tag(after) {
			t.Fatalf("program tag unchanged (%s): the reload did not swap in the new build", tag(after))
		}
		if !strings.Contains(c.out("journalctl", "--no-pager", "-u", "aegis-loader.service"), "upgraded program in place") {
			t.Fatal("the loader's journal does not show the in-place upgrade")
		}
	})

	t.Run("SIGKILL gets a daemon restarted", func(t *testing.T) {
		for _, u := range []string{"aegis-reaper.service", "aegis-controlplane.service"} {
			old := c.mainPID(u)
			c.run("systemctl", "kill", "-s", "KILL", u)
			c.waitNewPID(u, old, 20*time.Second)
		}
	})

	t.Run("watchdog restarts a daemon that stops pinging", func(t *testing.T) {
		u := "aegis-reaper.service"
		old := c.mainPID(u)
		c.run("kill", "-STOP", strconv.Itoa(old))
		c.waitNewPID(u, old, 20*time.Second)
		if !strings.Contains(c.out("journalctl", "--no-pager", "-u", u), "Watchdog timeout") {
			t.Fatal("the journal does not show a watchdog timeout")
		}
	})

	t.Run("the watcher re-attaches a re-created public interface", func(t *testing.T) {
		noSession := g.Serve(t, netip.AddrPortFrom(tu.ServiceBV4, 9000))
		if passed := recreateUnderProbes(t, g, noSession, sink.Addr, 2, nil); passed != 0 {
			t.Errorf("%d probes without a session passed the re-created interface; the guard should drop them all", passed)
		}
		if out, err := g.Gateway.Command("nft", "list", "table", "inet", guard.TableName).CombinedOutput(); err != nil {
			t.Errorf("the sandboxed watcher keeps no guard: %v\n%s", err, out)
		}
		journal := c.out("journalctl", "--no-pager", "-u", "aegis-watch.service")
		if strings.Contains(journal, "cannot update the guard") {
			t.Errorf("the sandboxed watcher cannot write the guard:\n%s", journal)
		}
		if n := strings.Count(journal, `"message":"re-attached XDP program"`); n < 3 {
			t.Errorf("%d re-attach lines in the watcher's journal, want 3:\n%s", n, journal)
		}
		if out, err := c.cmd("/usr/local/bin/aegis-loader", "status", "--pin-path", g.pin).CombinedOutput(); err != nil {
			t.Errorf("status after the re-creations: %v\n%s", err, out)
		}
		// The sandboxed daemons can judge the interface too (netlink).
		for u, want := range map[string]string{"aegis-watch.service": "1 configured interface(s), all filtered",
			"aegis-controlplane.service": "serving; "} {
			deadline := time.Now().Add(5 * time.Second)
			for !strings.HasPrefix(c.prop(u, "StatusText"), want) {
				if time.Now().After(deadline) {
					t.Errorf("%s status %q, want %q...", u, c.prop(u, "StatusText"), want)
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	})

	t.Run("stopping the loader stops both daemons and keeps the filter", func(t *testing.T) {
		c.run("systemctl", "stop", "aegis-loader.service")
		for _, u := range []string{"aegis-controlplane.service", "aegis-reaper.service", "aegis-controlplane.socket", "aegis-watch.service"} {
			if s := c.prop(u, "ActiveState"); s != "inactive" {
				t.Errorf("%s is %s after stopping the loader", u, s)
			}
		}
		// Fail closed: the data path stays attached and keeps enforcing.
		svc := netip.AddrPortFrom(tu.ServiceBV4, 8080)
		g.Serve(t, svc)
		g.expectBlocked("TCP without a session, loader stopped", bpf.ReasonNoSession, func() error {
			return g.TCP(tu.ClientV4, svc, probeTimeout)
		})
	})
}
