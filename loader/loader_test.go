package loader_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/bpf/nextbuild"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
)

// env is a network namespace with a veth pair (a0, a1) and a private pin
// directory.
type env struct {
	t   *testing.T
	ns  *tu.Netns
	pin string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, ns: tu.NewNetns(t, "aegis-ld-"), pin: tu.PinDir(t)}
	e.ns.AddVeth(t, "a0", "a1")
	return e
}

type result struct {
	code           int
	stdout, stderr string
}

// cli runs aegis-loader in-process inside the namespace.
func (e *env) cli(customize func(*loader.Loader), args ...string) result {
	e.t.Helper()
	var out, errb bytes.Buffer
	var code int
	if err := e.ns.Do(func() error {
		code = loader.MainWith(context.Background(), args, cli.IO{Stdout: &out, Stderr: &errb}, customize)
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

func (e *env) loadArgs(extra ...string) []string {
	return append([]string{"load", "--pin-path", e.pin, "-i", "a0", "-c", "198.51.100.5",
		"--group", "root", "--log-format", "json"}, extra...)
}

func (e *env) mustLoad(customize func(*loader.Loader), extra ...string) result {
	e.t.Helper()
	r := e.cli(customize, e.loadArgs(extra...)...)
	if r.code != 0 {
		e.t.Fatalf("load exited %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	return r
}

func (e *env) open() *state.Maps {
	e.t.Helper()
	m, err := state.Open(e.pin, state.OpenOptions{Writable: true})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	return m
}

// ids identifies the kernel objects behind the pins.
type ids struct {
	maps    map[string]ebpf.MapID
	link    link.ID
	program ebpf.ProgramID
	tag     string
}

func (e *env) ids(iface string) ids {
	e.t.Helper()
	out := ids{maps: map[string]ebpf.MapID{}}
	for _, name := range state.MapNames {
		m, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, name), nil)
		if err != nil {
			e.t.Fatal(err)
		}
		info, _ := m.Info()
		out.maps[name], _ = info.ID()
		m.Close()
	}
	lk, err := link.LoadPinnedLink(state.LinkPath(e.pin, iface), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		e.t.Fatal(err)
	}
	out.link, out.program = info.ID, info.Program
	p, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		e.t.Fatal(err)
	}
	defer p.Close()
	pi, _ := p.Info()
	out.tag = pi.Tag
	return out
}

// xdpProgram returns the id of the XDP program the kernel runs on iface,
// as netlink reports it, or 0.
func (e *env) xdpProgram(iface string) uint32 {
	e.t.Helper()
	var id uint32
	if err := e.ns.Do(func() error {
		l, err := netlink.LinkByName(iface)
		if err != nil {
			return err
		}
		if x := l.Attrs().Xdp; x != nil && x.Attached {
			id = x.ProgId
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return id
}

var testSession = state.Session{
	Key:  state.Key{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.10"), Port: 8080, Proto: state.TCP},
	User: "alice", IdleTimeout: time.Hour,
}

func (e *env) grant(s state.Session) {
	e.t.Helper()
	m := e.open()
	s.LastSeen, s.Created = state.Now(), state.Now()
	if err := m.Grant(s); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) mustHaveSession(s state.Session) {
	e.t.Helper()
	got, err := e.open().Lookup(s.Key)
	if err != nil {
		e.t.Fatalf("session %v: %v", s.Key, err)
	}
	if got.User != s.User {
		e.t.Fatalf("session %v has user %q, want %q", s.Key, got.User, s.User)
	}
}

func TestLoadCreatesPinsAndAttaches(t *testing.T) {
	e := newEnv(t)
	r := e.mustLoad(nil)
	if !strings.Contains(r.stdout, "attached a0") {
		t.Fatalf("stdout %q does not report the attach", r.stdout)
	}
	got := e.ids("a0")
	if p := e.xdpProgram("a0"); p != uint32(got.program) {
		t.Fatalf("kernel runs program %d on a0, link holds %d", p, got.program)
	}
	cfg, err := e.open().ReadConfig()
	if err != nil {
		t.Fatal(err)
	}
	want := state.Config{Controller: netip.MustParseAddr("198.51.100.5"), ControllerPort: 443, GRPCPort: 50001, DefaultIdleTimeout: 60 * time.Second,
		FlowIdleTCP: state.DefaultFlowIdleTCP, FlowIdleUDP: state.DefaultFlowIdleUDP, FlowIdleICMP: state.DefaultFlowIdleICMP, EventDropRate: 100}
	if cfg != want {
		t.Fatalf("config %+v, want %+v", cfg, want)
	}
}

func TestRerunChangesNothing(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "--allow", "203.0.113.0/24,tcp/22")
	e.grant(testSession)
	before := e.ids("a0")

	r := e.mustLoad(nil, "--allow", "203.0.113.0/24,tcp/22", "--json")
	var res loader.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatalf("result %q: %v", r.stdout, err)
	}
	if res.Changed() {
		t.Fatalf("rerun changed %+v", res)
	}
	after := e.ids("a0")
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("objects changed on rerun:\n%v\n%v", before, after)
	}
	e.mustHaveSession(testSession)
}

func TestConfigChangeRewritesOnlyConfig(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	before := e.ids("a0")

	e.mustLoad(nil, "-r", "30s", "--monitor", "--allow", "203.0.113.0/24,tcp/22")
	after := e.ids("a0")
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("a config change replaced objects:\n%v\n%v", before, after)
	}
	m := e.open()
	cfg, _ := m.ReadConfig()
	if cfg.DefaultIdleTimeout != 30*time.Second || !cfg.Monitor || cfg.AllowV4Prefixes != 1 {
		t.Fatalf("config not rewritten: %+v", cfg)
	}
	rules, err := state.ReadAllow(m)
	if err != nil || len(rules) != 1 || state.FormatAllowRule(rules[0]) != "203.0.113.0/24,tcp/22" {
		t.Fatalf("allow rules %v (%v)", rules, err)
	}
	e.mustHaveSession(testSession)

	// Dropping the rule removes it again.
	e.mustLoad(nil)
	if rules, _ := state.ReadAllow(e.open()); len(rules) != 0 {
		t.Fatalf("stale allow rules %v", rules)
	}
}

func TestUpgradeInPlace(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	before := e.ids("a0")

	useNext := func(l *loader.Loader) { l.Spec = nextbuild.LoadAegis }
	r := e.mustLoad(useNext)
	if !strings.Contains(r.stdout, "upgraded a0") {
		t.Fatalf("stdout %q does not report the upgrade", r.stdout)
	}
	after := e.ids("a0")
	if after.link != before.link {
		t.Fatalf("link replaced (%d -> %d): the upgrade must be link.Update on the pinned link", before.link, after.link)
	}
	if after.program == before.program || after.tag == before.tag {
		t.Fatalf("program not replaced: %v -> %v", before, after)
	}
	if fmt.Sprint(after.maps) != fmt.Sprint(before.maps) {
		t.Fatalf("maps replaced: %v -> %v", before.maps, after.maps)
	}
	if p := e.xdpProgram("a0"); p != uint32(after.program) {
		t.Fatalf("kernel runs %d, want the upgraded %d", p, after.program)
	}
	spec, _ := nextbuild.LoadAegis()
	p, _ := ebpf.NewProgramFromID(after.program)
	info, _ := p.Info()
	p.Close()
	if err := spec.Programs["aegis_xdp"].Compatible(info); err != nil {
		t.Fatalf("running program is not the next build: %v", err)
	}
	e.mustHaveSession(testSession)

	// Rerunning the new build is a no-op; the old build downgrades.
	if r := e.mustLoad(useNext); !strings.Contains(r.stdout, "already loaded") {
		t.Fatalf("rerun of the new build: %q", r.stdout)
	}
	if r := e.mustLoad(nil); !strings.Contains(r.stdout, "upgraded a0") {
		t.Fatalf("switching back: %q", r.stdout)
	}
	e.mustHaveSession(testSession)
}

func TestFailedUpgradeKeepsRunningProgram(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	before := e.ids("a0")

	r := e.cli(func(l *loader.Loader) {
		l.Spec = nextbuild.LoadAegis
		l.Update = func(link.Link, *ebpf.Program) error { return errors.New("injected update failure") }
	}, e.loadArgs()...)
	if r.code != 1 || !strings.Contains(r.stderr, "injected update failure") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	if after := e.ids("a0"); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("a failed upgrade changed objects:\n%v\n%v", before, after)
	}
	if p := e.xdpProgram("a0"); p != uint32(before.program) {
		t.Fatalf("kernel runs %d after a failed upgrade, want %d", p, before.program)
	}
	if _, err := os.Lstat(state.ProgramNextPath(e.pin)); !os.IsNotExist(err) {
		t.Fatalf("a failed upgrade left the staged program pinned: %v", err)
	}
	e.mustHaveSession(testSession)
}

func TestConcurrentLoadersSerialize(t *testing.T) {
	t.Run("waits for the lock", func(t *testing.T) {
		e := newEnv(t)
		if err := os.MkdirAll(e.pin, 0o750); err != nil {
			t.Fatal(err)
		}
		lock, err := state.LockDir(e.pin, true)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan result, 1)
		go func() { done <- e.cli(nil, e.loadArgs()...) }()
		select {
		case r := <-done:
			t.Fatalf("load finished while another writer held the lock: %+v", r)
		case <-time.After(500 * time.Millisecond):
		}
		if _, err := os.Stat(state.MapPath(e.pin, state.MapSessionsV4)); err == nil {
			t.Fatal("load created maps while another writer held the lock")
		}
		lock.Unlock()
		select {
		case r := <-done:
			if r.code != 0 {
				t.Fatalf("load after unlock: %+v", r)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("load did not finish after the lock was released")
		}
	})

	t.Run("many at once", func(t *testing.T) {
		e := newEnv(t)
		const n = 6
		var wg sync.WaitGroup
		results := make([]result, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i] = e.cli(nil, e.loadArgs()...)
			}()
		}
		wg.Wait()
		attached := 0
		for _, r := range results {
			if r.code != 0 {
				t.Fatalf("a concurrent load failed: %+v", r)
			}
			if strings.Contains(r.stdout, "attached a0") {
				attached++
			}
		}
		if attached != 1 {
			t.Fatalf("%d loaders attached; exactly one should have", attached)
		}
		links, _ := os.ReadDir(state.LinksPath(e.pin))
		if len(links) != 2 { // the XDP link and the egress link
			t.Fatalf("%d links pinned", len(links))
		}
		got := e.ids("a0")
		if p := e.xdpProgram("a0"); p != uint32(got.program) {
			t.Fatalf("kernel runs %d, pinned link holds %d", p, got.program)
		}
	})

	t.Run("load and unload race", func(t *testing.T) {
		e := newEnv(t)
		e.mustLoad(nil)
		var wg sync.WaitGroup
		var load, unload result
		wg.Add(2)
		go func() { defer wg.Done(); load = e.cli(nil, e.loadArgs()...) }()
		go func() { defer wg.Done(); unload = e.cli(nil, "unload", "--pin-path", e.pin) }()
		wg.Wait()
		if load.code != 0 || unload.code != 0 {
			t.Fatalf("load %+v unload %+v", load, unload)
		}
		// Whichever went second decides; the state must be whole either way.
		_, statErr := os.Stat(e.pin)
		attached := e.xdpProgram("a0") != 0
		switch {
		case statErr == nil:
			e.ids("a0") // every pin present
			if !attached {
				t.Fatal("pins present but a0 not attached")
			}
		case attached:
			t.Fatal("pins removed but a0 still attached")
		}
	})
}

func TestUnload(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "-i", "a1")
	if e.xdpProgram("a0") == 0 || e.xdpProgram("a1") == 0 {
		t.Fatal("not attached to both interfaces")
	}
	e.grant(testSession)

	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "a0"); r.code != 0 {
		t.Fatalf("unload -i a0: %+v", r)
	}
	if e.xdpProgram("a0") != 0 {
		t.Fatal("a0 still attached")
	}
	if e.xdpProgram("a1") == 0 {
		t.Fatal("unload -i a0 detached a1")
	}
	e.mustHaveSession(testSession)

	if r := e.cli(nil, "unload", "--pin-path", e.pin); r.code != 0 {
		t.Fatalf("unload: %+v", r)
	}
	if e.xdpProgram("a1") != 0 {
		t.Fatal("a1 still attached")
	}
	if _, err := os.Stat(e.pin); !os.IsNotExist(err) {
		t.Fatalf("pin directory left behind: %v", err)
	}
	if r := e.cli(nil, "unload", "--pin-path", e.pin); r.code != 0 || !strings.Contains(r.stdout, "not loaded") {
		t.Fatalf("second unload: %+v", r)
	}
}

func TestPinOwnershipAndModes(t *testing.T) {
	e := newEnv(t)
	const gid = 4242 // a numeric group need not exist in /etc/group
	e.mustLoad(nil, "--group", fmt.Sprint(gid))
	want := map[string]os.FileMode{
		e.pin: 0o750 | os.ModeDir, state.LinksPath(e.pin): 0o710 | os.ModeDir,
		state.LinkPath(e.pin, "a0"): 0o600, state.EgressLinkPath(e.pin, "a0"): 0o600, state.ProgramPath(e.pin): 0o600,
		state.EgressProgramPath(e.pin): 0o600,
		// Opening a program pin takes read and write; the daemons run it.
		state.LocalityProgramPath(e.pin): 0o660,
	}
	for _, name := range state.MapNames {
		want[state.MapPath(e.pin, name)] = 0o640
	}
	want[state.MapPath(e.pin, state.MapSessionsV4)] = 0o660
	want[state.MapPath(e.pin, state.MapSessionsV6)] = 0o660
	want[state.MapPath(e.pin, state.MapSweepSeq)] = 0o660
	want[state.MapPath(e.pin, state.MapTombsV4)] = 0o660 // revokes and the reaper write tombstones
	want[state.MapPath(e.pin, state.MapTombsV6)] = 0o660
	want[state.MapPath(e.pin, state.MapEvents)] = 0o660    // a ring buffer reader needs a writable descriptor
	want[state.MapPath(e.pin, state.MapPortMarks)] = 0o660 // the control plane marks sessions' ports
	want[state.SweepLockPath(e.pin)] = 0o750 | os.ModeDir
	// Every entry, not only the expected ones: nothing is world-accessible
	// and everything is root's.
	seen := 0
	err := filepath.WalkDir(e.pin, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		seen++
		mode, ok := want[path]
		switch {
		case !ok:
			t.Errorf("unexpected %s (%v)", path, fi.Mode())
		case fi.Mode() != mode:
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), mode)
		}
		if fi.Mode().Perm()&0o007 != 0 {
			t.Errorf("%s is world-accessible: %v", path, fi.Mode())
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != 0 {
			t.Errorf("%s is owned by uid %d", path, uid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(want) {
		t.Errorf("%d entries, want %d", seen, len(want))
	}
	out := tu.MustRun(t, "stat", "-c", "%u %g", state.MapPath(e.pin, state.MapSessionsV4), e.pin)
	if out != fmt.Sprintf("0 %d\n0 %d\n", gid, gid) {
		t.Fatalf("ownership:\n%s", out)
	}
}

func TestLoadErrors(t *testing.T) {
	notSupported := func(l *loader.Loader) {
		l.Attach = func(link.XDPOptions) (link.Link, error) {
			return nil, fmt.Errorf("failed to attach link: %w", ebpf.ErrNotSupported)
		}
	}
	for _, c := range []struct {
		name      string
		args      []string
		customize func(*loader.Loader)
		code      int
		stderr    string
		// residue: whether maps may be left pinned (only faults found
		// after validation leave the convergent state a rerun finishes).
		residue bool
	}{
		{"missing interface", []string{"-i", "nope0"}, nil, 1, `interface not found: "nope0" does not exist`, false},
		{"bad allow rule", []string{"--allow", "198.51.100.0/33,tcp/22"}, nil, 2, `allow rule "198.51.100.0/33,tcp/22"`, false},
		{"bad allow protocol", []string{"--allow", "198.51.100.0/24,gre"}, nil, 2, `protocol "gre"`, false},
		{"icmp with a port", []string{"--allow", "198.51.100.0/24,icmp/8"}, nil, 2, `icmp has no port`, false},
		{"short flow timeout", []string{"--flow-idle-udp", "100ms"}, nil, 1, `--flow-idle-udp 100ms`, false},
		{"bad controller address", []string{"-c", "198.51.100"}, nil, 2, `--ip "198.51.100"`, false},
		{"bad port", []string{"-p", "70000"}, nil, 2, `--port`, false},
		{"zero timeout", []string{"-r", "0s"}, nil, 1, `--rule-timeout 0s`, false},
		{"missing group", []string{"--group", "no-such-group-aegis"}, nil, 1, `group not found: "no-such-group-aegis"`, false},
		{"no xdp link support", nil, notSupported, 1, "kernel has no XDP bpf_link support", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.cli(c.customize, e.loadArgs(c.args...)...)
			if r.code != c.code {
				t.Fatalf("exit %d, want %d; stderr %q", r.code, c.code, r.stderr)
			}
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "aegis-loader: ") || !strings.Contains(last, c.stderr) {
				t.Fatalf("last stderr line %q, want one line with %q", last, c.stderr)
			}
			if e.xdpProgram("a0") != 0 {
				t.Fatal("a failed load left a0 attached")
			}
			if _, err := os.Stat(e.pin); !c.residue && !os.IsNotExist(err) {
				t.Fatalf("a rejected load created %s", e.pin)
			}
		})
	}

	t.Run("bpffs not mounted", func(t *testing.T) {
		e := newEnv(t)
		dir := filepath.Join(t.TempDir(), "aegis")
		r := e.cli(nil, "load", "--pin-path", dir, "-i", "a0", "--group", "root")
		if r.code != 1 || !strings.Contains(r.stderr, "no bpf filesystem at ") || !strings.Contains(r.stderr, "mount -t bpf") {
			t.Fatalf("%+v", r)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Fatal("created the pin directory on a non-bpffs filesystem")
		}
	})
}

func TestIncompatiblePinnedMapIsKept(t *testing.T) {
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		make func() *ebpf.MapSpec
		want string
	}{
		{"value size", func() *ebpf.MapSpec {
			return &ebpf.MapSpec{Name: "sessions_v4", Type: ebpf.Hash, KeySize: 12, ValueSize: 8, MaxEntries: 262144, Flags: 1}
		}, "ValueSize: 8 changed to 64"},
		{"field layout", func() *ebpf.MapSpec {
			ms := spec.Maps[state.MapSessionsV4].Copy()
			v := btf.Copy(ms.Value).(*btf.Struct)
			v.Members[0].Name, v.Members[1].Name = v.Members[1].Name, v.Members[0].Name
			ms.Value = v
			return ms
		}, "layout of struct session_value changed"},
		{"layout version", func() *ebpf.MapSpec {
			// A config map written by a release with another layout.
			return spec.Maps[state.MapConfig].Copy()
		}, fmt.Sprintf("layout version 99, newer than this aegis-loader's %d: they were made by a later release", bpf.LayoutVersion)},
		{"capacity", func() *ebpf.MapSpec {
			ms := spec.Maps[state.MapSessionsV4].Copy()
			ms.MaxEntries = 1000
			return ms
		}, "holds up to 1000 sessions, --max-sessions asks for 262144"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			if err := os.MkdirAll(e.pin, 0o750); err != nil {
				t.Fatal(err)
			}
			ms := c.make()
			m, err := ebpf.NewMap(ms)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			key := make([]byte, m.KeySize())
			val := bytes.Repeat([]byte{7}, int(m.ValueSize()))
			if ms.Name == state.MapConfig {
				val = make([]byte, m.ValueSize())
				val[0] = 99 // layout_version, first field
			}
			if err := m.Put(key, val); err != nil {
				t.Fatal(err)
			}
			path := state.MapPath(e.pin, ms.Name)
			if err := m.Pin(path); err != nil {
				t.Fatal(err)
			}

			r := e.cli(nil, e.loadArgs()...)
			if r.code != 1 || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("exit %d, stderr %q, want %q", r.code, r.stderr, c.want)
			}
			if e.xdpProgram("a0") != 0 {
				t.Fatal("attached over an incompatible map")
			}
			again, err := ebpf.LoadPinnedMap(path, nil)
			if err != nil {
				t.Fatalf("the incompatible map was removed: %v", err)
			}
			defer again.Close()
			got := make([]byte, again.ValueSize())
			if err := again.Lookup(key, &got); err != nil || !bytes.Equal(got, val) {
				t.Fatalf("the incompatible map's entry was changed: %v", err)
			}
		})
	}
}

func TestForeignXDPProgramRefused(t *testing.T) {
	e := newEnv(t)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if err := e.ns.Do(func() error {
		l, err := netlink.LinkByName("a0")
		if err != nil {
			return err
		}
		return netlink.LinkSetXdpFd(l, prog.FD())
	}); err != nil {
		t.Fatal(err)
	}
	foreign := e.xdpProgram("a0")
	r := e.cli(nil, e.loadArgs()...)
	if r.code != 1 || !strings.Contains(r.stderr, "already has a foreign XDP program") || !strings.Contains(r.stderr, "xdp off") {
		t.Fatalf("%+v", r)
	}
	if e.xdpProgram("a0") != foreign {
		t.Fatal("the foreign program was replaced")
	}
}

func TestModeChangeRefused(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "--mode", "generic")
	before := e.ids("a0")
	r := e.cli(nil, e.loadArgs("--mode", "native")...)
	if r.code != 1 || !strings.Contains(r.stderr, "runs XDP in generic mode, --mode asks for native") {
		t.Fatalf("%+v", r)
	}
	if fmt.Sprint(e.ids("a0")) != fmt.Sprint(before) {
		t.Fatal("a refused mode change changed objects")
	}
	e.mustLoad(nil, "--mode", "generic")
	e.mustLoad(nil) // auto accepts whatever runs
}

func TestRecreatedInterfaceIsReattached(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	if e.xdpProgram("a0") != 0 {
		t.Fatal("new a0 already attached")
	}
	r := e.mustLoad(nil)
	if !strings.Contains(r.stdout, "reattached a0") || !strings.Contains(r.stdout, "attached a0") {
		t.Fatalf("stdout %q", r.stdout)
	}
	if e.xdpProgram("a0") != uint32(e.ids("a0").program) {
		t.Fatal("a0 not attached to the pinned link's program")
	}
	e.mustHaveSession(testSession)
}

// bpftool prints the sessions map with its BTF: addresses as byte arrays,
// the port in host order, the user as a string.
func TestBpftoolDumpIsReadable(t *testing.T) {
	if _, err := exec.LookPath("bpftool"); err != nil {
		if os.Getenv(tu.RequireKernelEnv) == "1" {
			t.Fatal("bpftool not installed")
		}
		t.Skip("bpftool not installed")
	}
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	e.grant(state.Session{Key: state.Key{
		Src: netip.MustParseAddr("2001:db8:1::10"), Dst: netip.MustParseAddr("2001:db8:2::10"), Port: 22, Proto: state.UDP,
	}, User: "bob"})

	out := tu.MustRun(t, "bpftool", "map", "dump", "pinned", state.MapPath(e.pin, state.MapSessionsV4))
	for _, want := range []string{`"src": [192,0,2,10`, `"dst": [198,51,100,10`, `"dport": 8080`, `"proto": 6`, `"user": "alice"`} {
		if !strings.Contains(out, want) {
			t.Errorf("bpftool output lacks %s:\n%s", want, out)
		}
	}

	var dump []struct {
		Formatted struct {
			Key struct {
				Src   []int `json:"src"`
				Dport int   `json:"dport"`
				Proto int   `json:"proto"`
			} `json:"key"`
			Value struct {
				User        string `json:"user"`
				LastSeenNs  uint64 `json:"last_seen_ns"`
				IdleTimeout uint64 `json:"idle_timeout_ns"`
			} `json:"value"`
		} `json:"formatted"`
	}
	raw := tu.MustRun(t, "bpftool", "-j", "map", "dump", "pinned", state.MapPath(e.pin, state.MapSessionsV6))
	if err := json.Unmarshal([]byte(raw), &dump); err != nil {
		t.Fatalf("bpftool -j: %v\n%s", err, raw)
	}
	if len(dump) != 1 {
		t.Fatalf("%d entries in sessions_v6", len(dump))
	}
	k, v := dump[0].Formatted.Key, dump[0].Formatted.Value
	if fmt.Sprint(k.Src) != "[32 1 13 184 0 1 0 0 0 0 0 0 0 0 0 16]" || k.Dport != 22 || k.Proto != 17 || v.User != "bob" || v.LastSeenNs == 0 {
		t.Fatalf("formatted entry %+v %+v", k, v)
	}
}

func TestStatus(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "--allow", "203.0.113.0/24,tcp/22")
	e.grant(testSession)
	r := e.cli(nil, "status", "--pin-path", e.pin, "--json")
	if r.code != 0 {
		t.Fatalf("%+v", r)
	}
	var st loader.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Interfaces) != 1 || st.Interfaces[0].Name != "a0" || !st.Interfaces[0].Attached || !st.Interfaces[0].Current {
		t.Fatalf("interfaces %+v", st.Interfaces)
	}
	if st.Maps[0].Name != "sessions_v4" || st.Maps[0].Entries != 1 || st.Maps[0].Capacity != 262144 {
		t.Fatalf("maps %+v", st.Maps)
	}
	if st.Config.Controller != "198.51.100.5" || len(st.Allow) != 1 {
		t.Fatalf("config %+v allow %v", st.Config, st.Allow)
	}
	if len(st.Counters) != len(state.Reasons) {
		t.Fatalf("counters %+v", st.Counters)
	}

	text := e.cli(nil, "status", "--pin-path", e.pin)
	for _, want := range []string{"a0", "sessions_v4", "198.51.100.5 port 443", "no_session"} {
		if !strings.Contains(text.stdout, want) {
			t.Errorf("status lacks %q:\n%s", want, text.stdout)
		}
	}

	missing := e.cli(nil, "status", "--pin-path", e.pin+"-missing")
	if missing.code != 1 || !strings.Contains(missing.stderr, "not loaded: run aegis-loader load first") {
		t.Fatalf("status without pins: %+v", missing)
	}
}

// bpffs refuses pin names with a dot; VLAN interfaces are named like
// eth0.100. (A veth with such a name stands in for one: this kernel has no
// 802.1Q module.)
func TestDottedInterfaceName(t *testing.T) {
	e := newEnv(t)
	e.ns.AddVeth(t, "a0.100", "a2")
	r := e.mustLoad(nil, "-i", "a0.100")
	if !strings.Contains(r.stdout, "attached a0,a0.100") {
		t.Fatalf("stdout %q", r.stdout)
	}
	if e.xdpProgram("a0.100") == 0 {
		t.Fatal("a0.100 not attached")
	}
	if r := e.mustLoad(nil, "-i", "a0.100"); !strings.Contains(r.stdout, "already loaded") {
		t.Fatalf("rerun: %q", r.stdout)
	}
	st := e.cli(nil, "status", "--pin-path", e.pin)
	if !strings.Contains(st.stdout, "a0.100") {
		t.Fatalf("status lacks a0.100:\n%s", st.stdout)
	}
	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "a0.100"); r.code != 0 || e.xdpProgram("a0.100") != 0 {
		t.Fatalf("unload -i a0.100: %+v", r)
	}
}

// An upgrade that stops half-way (here: the second link's update fails)
// leaves interfaces on different builds; the next load converges them.
func TestInterruptedUpgradeConverges(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "-i", "a1")
	e.grant(testSession)
	old := e.ids("a0")

	calls := 0
	r := e.cli(func(l *loader.Loader) {
		l.Spec = nextbuild.LoadAegis
		l.Update = func(lk link.Link, p *ebpf.Program) error {
			if calls++; calls == 2 {
				return errors.New("injected crash")
			}
			return lk.Update(p)
		}
	}, e.loadArgs("-i", "a1")...)
	if r.code != 1 {
		t.Fatalf("half-way upgrade: %+v", r)
	}
	if e.xdpProgram("a0") == e.xdpProgram("a1") {
		t.Fatal("the injected failure did not leave the links on different programs")
	}

	useNext := func(l *loader.Loader) { l.Spec = nextbuild.LoadAegis }
	e.mustLoad(useNext, "-i", "a1")
	a0, a1 := e.ids("a0"), e.ids("a1")
	if a0.program != a1.program || a0.program == old.program {
		t.Fatalf("not converged: a0 runs %d, a1 runs %d (old %d)", a0.program, a1.program, old.program)
	}
	p, err := ebpf.LoadPinnedProgram(state.ProgramPath(e.pin), nil)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := p.Info()
	p.Close()
	if id, _ := info.ID(); id != a0.program {
		t.Fatalf("program pin holds %d, links run %d", id, a0.program)
	}
	if _, err := os.Stat(state.ProgramNextPath(e.pin)); !os.IsNotExist(err) {
		t.Fatalf("staging pin left behind: %v", err)
	}
	e.mustHaveSession(testSession)
}

// The program declares multi-buffer support, so it attaches in native mode
// to an interface with jumbo frames.
func TestJumboMTUNativeAttach(t *testing.T) {
	e := newEnv(t)
	e.ns.Run(t, "ip", "link", "set", "a0", "mtu", "9000")
	e.ns.Run(t, "ip", "link", "set", "a1", "mtu", "9000")
	e.mustLoad(nil, "--mode", "native")
	if e.xdpProgram("a0") == 0 {
		t.Fatal("not attached")
	}
}

// A load leaves the flow marks trusted (it marked the flows an earlier
// build made) and the session marks not: whether the daemons beside the
// new program mark is theirs to say, and the control plane trusts them
// again once it has marked every session's port.
func TestLoadTrustsFlowMarksOnly(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	m := e.open()
	trusted := func(wantSessions, wantFlows bool) {
		t.Helper()
		s, f, err := state.MarksTrusted(m.PortMarks)
		if err != nil || s != wantSessions || f != wantFlows {
			t.Fatalf("trusted: sessions %v flows %v (%v), want %v %v", s, f, err, wantSessions, wantFlows)
		}
	}
	trusted(false, true)
	if set, err := m.TrustSessionMarks(); err != nil || !set {
		t.Fatalf("trust session marks: %v %v", set, err)
	}
	trusted(true, true)
	e.mustLoad(nil)
	trusted(false, true)
}
