package loader_test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/loader"
)

// The unit's --no-builtin-defaults refuses a load whose interface or
// controller would come from the flags' defaults, with EX_CONFIG, before
// creating anything; interactively the defaults work and are warned about.
func TestBuiltinDefaults(t *testing.T) {
	e := newEnv(t)
	for _, v := range []string{"AEGIS_IFACE", "AEGIS_IP"} {
		if old, ok := os.LookupEnv(v); ok {
			os.Unsetenv(v)
			t.Cleanup(func() { os.Setenv(v, old) })
		}
	}
	r := e.cli(nil, "load", "--pin-path", e.pin, "--group", "root", "--no-builtin-defaults")
	if r.code != cli.ExitConfig || !strings.Contains(r.stderr, "AEGIS_IFACE") || !strings.Contains(r.stderr, "AEGIS_IP") {
		t.Fatalf("%+v", r)
	}
	r = e.cli(nil, "load", "--pin-path", e.pin, "--group", "root", "--no-builtin-defaults", "-i", "a0")
	if r.code != cli.ExitConfig || strings.Contains(r.stderr, "--iface eth0") || !strings.Contains(r.stderr, "--ip 172.21.0.5 (AEGIS_IP)") {
		t.Fatalf("%+v", r)
	}
	if _, err := os.Stat(e.pin); err == nil {
		t.Fatal("a refused load created the pin directory")
	}
	t.Setenv("AEGIS_IP", "198.51.100.5")
	e.mustLoad(nil) // -i and -c given
	r = e.cli(nil, "load", "--pin-path", e.pin, "--group", "root", "--no-builtin-defaults", "-ia0")
	if r.code != 0 {
		t.Fatalf("%+v", r)
	}
	os.Unsetenv("AEGIS_IP")
	r = e.cli(nil, "load", "--pin-path", e.pin, "--group", "root", "-i", "a0", "--dry-run")
	if r.code != 0 || !strings.Contains(r.stdout, "built-in defaults  --ip 172.21.0.5") {
		t.Fatalf("%+v", r)
	}
	r = e.cli(nil, "load", "--pin-path", e.pin, "--group", "root", "-i", "a0", "--log-format", "json")
	if r.code != 0 || !strings.Contains(r.stderr, "loading with built-in defaults") || !strings.Contains(r.stderr, "--ip 172.21.0.5") {
		t.Fatalf("%+v", r)
	}
}

// The foreign-program hint tells a netlink attachment from a bpf_link:
// only the first can be removed with "ip link set dev X xdp off".
func TestForeignXDPHint(t *testing.T) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()

	t.Run("bpf_link", func(t *testing.T) {
		e := newEnv(t)
		var lk link.Link
		if err := e.ns.Do(func() error {
			l, err := netlink.LinkByName("a0")
			if err != nil {
				return err
			}
			lk, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: l.Attrs().Index})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		info, err := lk.Info()
		if err != nil {
			t.Fatal(err)
		}
		r := e.cli(nil, e.loadArgs()...)
		if r.code != 1 || !strings.Contains(r.stderr, fmt.Sprintf("bpftool link detach id %d", info.ID)) ||
			!strings.Contains(r.stderr, "cannot remove a bpf_link") {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("netlink", func(t *testing.T) {
		e := newEnv(t)
		if err := e.ns.Do(func() error {
			l, err := netlink.LinkByName("a0")
			if err != nil {
				return err
			}
			return netlink.LinkSetXdpFd(l, prog.FD())
		}); err != nil {
			t.Fatal(err)
		}
		r := e.cli(nil, e.loadArgs()...)
		if r.code != 1 || !strings.Contains(r.stderr, "bpftool net detach xdp dev a0") || strings.Contains(r.stderr, "bpftool link") {
			t.Fatalf("%+v", r)
		}
	})
}

// A loader that waits on the pin directory's lock says for whom.
func TestLockWaitIsReported(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	holder := exec.Command("flock", "-x", e.pin, "sleep", "30")
	// Its own process group: sleep inherits the locked fd, so both go.
	holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	release := func() { _ = syscall.Kill(-holder.Process.Pid, syscall.SIGKILL) }
	defer func() { release(); _ = holder.Wait() }()
	// flock(1) takes the lock itself, then runs sleep.
	for deadline := time.Now().Add(5 * time.Second); ; {
		b, _ := os.ReadFile("/proc/locks")
		if strings.Contains(string(b), fmt.Sprintf(" %d ", holder.Process.Pid)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("flock never took the lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
	done := make(chan result, 1)
	go func() { done <- e.cli(nil, e.loadArgs()...) }()
	time.Sleep(1500 * time.Millisecond)
	release()
	r := <-done
	want := fmt.Sprintf("waiting for another aegis-loader (pid %d) holding the lock on %s", holder.Process.Pid, e.pin)
	if r.code != 0 || !strings.Contains(r.stderr, want) {
		t.Fatalf("want %q in %+v", want, r)
	}
}

// The lock-out check asks the data path's model, with the pinned sessions:
// a session the controller granted for the operator's connection carries
// it, an expired one does not; over IPv4 and IPv6.
func TestLockoutCheckUsesPinnedSessions(t *testing.T) {
	e := newEnv(t)
	e.ns.Run(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "a0")
	peer := netip.MustParseAddrPort("192.0.2.10:40000")
	local := netip.MustParseAddrPort("192.0.2.1:22")
	conns := func(l *loader.Loader) {
		l.OperatorConnections = func() ([]loader.Connection, error) {
			return []loader.Connection{{Peer: peer, Local: local, Source: "test"}}, nil
		}
	}
	r := e.cli(conns, e.loadArgs()...)
	if r.code != 1 || !strings.Contains(r.stderr, "--allow 192.0.2.10/32,tcp/22") {
		t.Fatalf("%+v", r)
	}
	// Load monitor-only to create the maps, grant the operator's
	// session, then enforce.
	e.mustLoad(conns, "--monitor")
	m := e.open()
	s := state.Session{Key: state.Key{Src: peer.Addr(), Dst: local.Addr(), Port: 22, Proto: state.TCP}, User: "ops"}
	s.LastSeen, s.Created = state.Now(), state.Now()
	if err := m.Grant(s); err != nil {
		t.Fatal(err)
	}
	if r := e.cli(conns, e.loadArgs()...); r.code != 0 {
		t.Fatalf("a granted session did not carry the load: %+v", r)
	}
	// The same session, idle past its own timeout: expired, it carries
	// nothing.
	s.IdleTimeout, s.LastSeen = time.Second, state.Now()-uint64(10*time.Second)
	if err := m.Grant(s); err != nil {
		t.Fatal(err)
	}
	if r := e.cli(conns, e.loadArgs("--rule-timeout", "2m")...); r.code != 1 || !strings.Contains(r.stderr, "refusing to cut") {
		t.Fatalf("a config change with the session expired was not refused: %+v", r)
	}
	// IPv6 the same way, through the model's IPv6 path.
	e.ns.Run(t, "ip", "addr", "add", "2001:db8:1::1/64", "dev", "a0", "nodad")
	peer6 := netip.MustParseAddrPort("[2001:db8:1::10]:40000")
	conns6 := func(l *loader.Loader) {
		l.OperatorConnections = func() ([]loader.Connection, error) {
			return []loader.Connection{{Peer: peer6, Local: netip.MustParseAddrPort("[2001:db8:1::1]:22"), Source: "test"}}, nil
		}
	}
	if r := e.cli(conns6, e.loadArgs("--rule-timeout", "2m")...); r.code != 1 || !strings.Contains(r.stderr, "--allow 2001:db8:1::10/128,tcp/22") {
		t.Fatalf("%+v", r)
	}
	if r := e.cli(conns6, e.loadArgs("--rule-timeout", "2m", "--allow", "2001:db8:1::/64,tcp/22")...); r.code != 0 {
		t.Fatalf("%+v", r)
	}
	// A granted IPv6 session carries a load that drops that allow rule.
	s6 := state.Session{Key: state.Key{Src: peer6.Addr(), Dst: netip.MustParseAddr("2001:db8:1::1"), Port: 22, Proto: state.TCP}, User: "ops"}
	s6.LastSeen, s6.Created = state.Now(), state.Now()
	if err := m.Grant(s6); err != nil {
		t.Fatal(err)
	}
	if r := e.cli(conns6, e.loadArgs("--rule-timeout", "2m")...); r.code != 0 {
		t.Fatalf("a granted IPv6 session did not carry the load: %+v", r)
	}
}

// /proc/net/tcp{,6} print addresses as the kernel's 32-bit words in host
// order; an IPv4 peer of a dual-stack sshd appears IPv4-mapped in tcp6.
func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0A0200C0:0016":                         "192.0.2.10:22",
		"B80D0120000001000000000010000000:0016": "[2001:db8:1::10]:22",
		"0000000000000000FFFF00000A0200C0:9C40": "192.0.2.10:40000",
	} {
		got, ok := loader.ParseProcAddr(in)
		if !ok || got.String() != want {
			t.Errorf("%s: %v %v, want %s", in, got, ok, want)
		}
	}
	for _, bad := range []string{"", "0A0200C0", "0A02:0016", "zz0200C0:0016", "0A0200C0:10000"} {
		if got, ok := loader.ParseProcAddr(bad); ok {
			t.Errorf("%q: parsed as %v", bad, got)
		}
	}
}

// A default route through a filtered interface: the next hop's replies to
// this host would be dropped, which is a warning (not the operator's
// session); an allow rule for the next hop silences it.
func TestDefaultGatewayWarning(t *testing.T) {
	e := newEnv(t)
	e.ns.Run(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "a0")
	e.ns.Run(t, "ip", "route", "add", "default", "via", "192.0.2.254", "dev", "a0")
	none := func(l *loader.Loader) {
		l.OperatorConnections = func() ([]loader.Connection, error) { return nil, nil }
	}
	const warning = "the default route's next hop 192.0.2.254 is on a0"
	r := e.cli(none, e.loadArgs("--dry-run", "--json", "--log-level", "error")...)
	if r.code != 0 || !strings.Contains(r.stdout, `"what": "default gateway"`) || !strings.Contains(r.stdout, `"severity": "warn"`) ||
		strings.Contains(r.stdout, `"refused"`) {
		t.Fatalf("%+v", r)
	}
	r = e.mustLoad(none)
	if !strings.Contains(r.stderr, warning) || !strings.Contains(r.stderr, "--allow 192.0.2.254/32") {
		t.Fatalf("no warning: %+v", r)
	}
	r = e.mustLoad(none, "--allow", "192.0.2.254/32")
	if strings.Contains(r.stderr, warning) {
		t.Fatalf("warned despite the allow rule: %+v", r)
	}
}
