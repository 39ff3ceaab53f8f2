package loader_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/bpf/nextbuild"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/loader"
)

// egressIDs returns the egress link pinned for iface: its id, its
// program's id and the interface it is attached to (0: detached).
func (e *env) egressIDs(iface string) (link.ID, ebpf.ProgramID, int) {
	e.t.Helper()
	lk, err := link.LoadPinnedLink(state.EgressLinkPath(e.pin, iface), nil)
	if err != nil {
		e.t.Fatalf("egress link of %s: %v", iface, err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		e.t.Fatal(err)
	}
	ifindex := 0
	if x := info.TCX(); x != nil {
		ifindex = int(x.Ifindex)
		if ebpf.AttachType(x.AttachType) != ebpf.AttachTCXEgress {
			e.t.Fatalf("egress link of %s attached as %v", iface, x.AttachType)
		}
	}
	return info.ID, info.Program, ifindex
}

func (e *env) loadJSON(customize func(*loader.Loader), extra ...string) loader.Result {
	e.t.Helper()
	r := e.mustLoad(customize, append(extra, "--json")...)
	var res loader.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		e.t.Fatalf("result %q: %v", r.stdout, err)
	}
	return res
}

// The egress program shares the XDP program's flows maps: the kernel's
// list of the maps it uses holds the pinned flows_v4 and flows_v6.
func TestEgressLinkLifecycle(t *testing.T) {
	e := newEnv(t)
	res := e.loadJSON(nil)
	if !slices.Equal(res.EgressAttached, []string{"a0"}) {
		t.Fatalf("first load: %+v", res)
	}
	linkID, progID, ifindex := e.egressIDs("a0")
	var a0 int
	if err := e.ns.Do(func() error {
		i, err := netInterface("a0")
		a0 = i
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if ifindex != a0 {
		t.Fatalf("egress link on ifindex %d, a0 is %d", ifindex, a0)
	}
	p, err := ebpf.NewProgramFromID(progID)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := p.Info()
	p.Close()
	used, _ := info.MapIDs()
	for _, name := range []string{state.MapFlowsV4, state.MapFlowsV6, state.MapConfig} {
		if id := e.ids("a0").maps[name]; !slices.Contains(used, id) {
			t.Fatalf("egress program uses maps %v, not the pinned %s (%d)", used, name, id)
		}
	}

	// A rerun changes nothing.
	if res := e.loadJSON(nil); res.Changed() {
		t.Fatalf("rerun changed %+v", res)
	}
	if l2, p2, _ := e.egressIDs("a0"); l2 != linkID || p2 != progID {
		t.Fatalf("rerun replaced the egress link or program: %d/%d -> %d/%d", linkID, progID, l2, p2)
	}

	// A new build moves the same link to its program.
	useNext := func(l *loader.Loader) { l.Spec = nextbuild.LoadAegis }
	res = e.loadJSON(useNext)
	if !slices.Equal(res.EgressUpgraded, []string{"a0"}) || len(res.EgressAttached) != 0 {
		t.Fatalf("upgrade: %+v", res)
	}
	l2, p2, _ := e.egressIDs("a0")
	if l2 != linkID || p2 == progID {
		t.Fatalf("upgrade: link %d -> %d (must stay), program %d -> %d (must change)", linkID, l2, progID, p2)
	}
	spec, _ := nextbuild.LoadAegis()
	np, _ := ebpf.NewProgramFromID(p2)
	ninfo, _ := np.Info()
	np.Close()
	if err := spec.Programs["aegis_egress"].Compatible(ninfo); err != nil {
		t.Fatalf("egress runs another build than the next one: %v", err)
	}
	if res := e.loadJSON(useNext); res.Changed() {
		t.Fatalf("rerun of the new build changed %+v", res)
	}

	// Status shows both links.
	st := e.statusJSON(useNext)
	if len(st.Interfaces) != 1 || st.Interfaces[0].Egress == nil || !st.Interfaces[0].Egress.Attached ||
		st.Interfaces[0].Egress.LinkID != uint32(linkID) || !st.Interfaces[0].Egress.Current || !st.Config.ReplyTracking {
		t.Fatalf("status %+v", st)
	}

	// Switching reply tracking off detaches the egress link and tells the
	// data path; switching it on attaches it again.
	res = e.loadJSON(useNext, "--no-reply-tracking")
	if !slices.Equal(res.EgressDetached, []string{"a0"}) || !res.ConfigWritten {
		t.Fatalf("--no-reply-tracking: %+v", res)
	}
	if _, err := os.Stat(state.EgressLinkPath(e.pin, "a0")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("egress pin left: %v", err)
	}
	if cfg, _ := e.open().ReadConfig(); !cfg.NoFlowTracking {
		t.Fatal("config still tracks flows")
	}
	if res := e.loadJSON(useNext, "--no-reply-tracking"); res.Changed() {
		t.Fatalf("rerun without reply tracking changed %+v", res)
	}
	if st := e.statusJSON(useNext); st.Interfaces[0].Egress != nil || st.Config.ReplyTracking {
		t.Fatalf("status without reply tracking %+v", st)
	}
	if res := e.loadJSON(nil); !slices.Equal(res.EgressAttached, []string{"a0"}) {
		t.Fatalf("reply tracking back on: %+v", res)
	}

	// Unloading one interface detaches both its links.
	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "a0"); r.code != 0 {
		t.Fatalf("unload -i a0: %+v", r)
	}
	if _, err := os.Stat(state.EgressLinkPath(e.pin, "a0")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("egress pin left after unload -i: %v", err)
	}
	if n := tcxEgressCount(t, e, "a0"); n != 0 {
		t.Fatalf("%d tcx egress programs left on a0", n)
	}
}

// A full unload detaches every egress link, and a recreated interface
// gets a new one.
func TestEgressRecreatedInterfaceAndUnload(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "-i", "a1")
	old, _, _ := e.egressIDs("a0")
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	res := e.loadJSON(nil, "-i", "a1")
	if !slices.Equal(res.EgressAttached, []string{"a0", "a1"}) {
		t.Fatalf("after recreating a0: %+v", res)
	}
	if id, _, ifindex := e.egressIDs("a0"); id == old || ifindex == 0 {
		t.Fatalf("a0's egress link %d (was %d) on ifindex %d", id, old, ifindex)
	}
	if n := tcxEgressCount(t, e, "a0"); n != 1 {
		t.Fatalf("%d tcx egress programs on a0, want 1", n)
	}
	if r := e.cli(nil, "unload", "--pin-path", e.pin); r.code != 0 {
		t.Fatalf("unload: %+v", r)
	}
	for _, ifc := range []string{"a0", "a1"} {
		if n := tcxEgressCount(t, e, ifc); n != 0 {
			t.Fatalf("%d tcx egress programs left on %s", n, ifc)
		}
	}
}

// On a kernel without tcx the load fails with one line naming the way to
// run without the reply path, and leaves the XDP half attached.
func TestNoTCXFailsClearly(t *testing.T) {
	e := newEnv(t)
	noTCX := func(l *loader.Loader) {
		l.AttachTCX = func(link.TCXOptions) (link.Link, error) {
			return nil, fmt.Errorf("attach tcx link: %w", ebpf.ErrNotSupported)
		}
	}
	r := e.cli(noTCX, e.loadArgs()...)
	if r.code == 0 || !strings.Contains(r.stderr, "--no-reply-tracking") || !strings.Contains(r.stderr, "Linux 6.6") {
		t.Fatalf("load without tcx: %+v", r)
	}
	if res := e.loadJSON(noTCX, "--no-reply-tracking"); len(res.EgressAttached) != 0 {
		t.Fatalf("without reply tracking: %+v", res)
	}
	if cfg, _ := e.open().ReadConfig(); !cfg.NoFlowTracking {
		t.Fatal("config tracks flows without the egress program")
	}
}

func TestFlowFlags(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "--flow-idle-tcp", "2s", "--flow-idle-udp", "3s", "--flow-idle-icmp", "4s")
	cfg, _ := e.open().ReadConfig()
	if cfg.FlowIdleTCP.Seconds() != 2 || cfg.FlowIdleUDP.Seconds() != 3 || cfg.FlowIdleICMP.Seconds() != 4 || cfg.NoFlowTracking {
		t.Fatalf("config %+v", cfg)
	}
	for _, bad := range [][]string{{"--flow-idle-tcp", "10ms"}, {"--allow", "203.0.113.0/24,icmp/8"}} {
		if r := e.cli(nil, e.loadArgs(bad...)...); r.code == 0 {
			t.Fatalf("%v accepted: %+v", bad, r)
		}
	}
	e.mustLoad(nil, "--allow", "203.0.113.0/24,icmp")
	if st := e.statusJSON(nil); !slices.Contains(st.Allow, "203.0.113.0/24,icmp") {
		t.Fatalf("allow %v", st.Allow)
	}
}

func (e *env) statusJSON(customize func(*loader.Loader)) loader.Status {
	e.t.Helper()
	r := e.cli(customize, "status", "--pin-path", e.pin, "--json")
	if r.code != 0 {
		e.t.Fatalf("status: %+v", r)
	}
	var st loader.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		e.t.Fatal(err)
	}
	return st
}

func netInterface(name string) (int, error) {
	i, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return i.Index, nil
}

// tcxEgressCount is the number of programs the kernel runs on iface's tcx
// egress hook.
func tcxEgressCount(t *testing.T, e *env, iface string) int {
	t.Helper()
	n := 0
	if err := e.ns.Do(func() error {
		idx, err := netInterface(iface)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: ebpf.AttachTCXEgress})
		if err != nil {
			return err
		}
		n = len(res.Programs)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// The watcher re-attaches a re-created interface's egress link with its
// XDP link, running the program the old link ran (no new load), and
// leaves an interface loaded without reply tracking without one.
func TestWatchReattachesEgress(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	_, prog, _ := e.egressIDs("a0")
	w, _ := e.startWatcher(time.Hour)
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	e.waitFor("a repair", func() bool { return w.Repairs() == 1 })
	e.waitFor("the egress link", func() bool { return tcxEgressCount(t, e, "a0") == 1 })
	_, nprog, ifindex := e.egressIDs("a0")
	var a0 int
	_ = e.ns.Do(func() error { a0, _ = netInterface("a0"); return nil })
	if ifindex != a0 || nprog != prog {
		t.Fatalf("egress link on ifindex %d (a0 is %d) running program %d (was %d)", ifindex, a0, nprog, prog)
	}
	if res := e.loadJSON(nil); res.Changed() {
		t.Fatalf("a load after the repair changed %+v", res)
	}

	e.mustLoad(nil, "--no-reply-tracking")
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	e.waitFor("a second repair", func() bool { return w.Repairs() == 2 })
	if n := tcxEgressCount(t, e, "a0"); n != 0 {
		t.Fatalf("%d egress programs on a0 without reply tracking", n)
	}
}
