package loader_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/loader"
)

// records reads the configured-interfaces map.
func (e *env) records() map[string]state.Interface {
	e.t.Helper()
	list, err := state.ReadInterfaces(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]state.Interface{}
	for _, r := range list {
		out[r.Name] = r
	}
	return out
}

// verdict judges one configured interface inside the namespace, and
// checks that an observer that may not open the link (the daemons) comes
// to the same verdict from the record.
func (e *env) verdict(name string) state.Filtering {
	e.t.Helper()
	var v state.Filtering
	if err := e.ns.Do(func() error {
		rec, ok := e.records()[name]
		if !ok {
			e.t.Fatalf("%s not configured", name)
		}
		o, err := state.Observe(e.pin, rec)
		if err != nil {
			return err
		}
		v = state.Judge(o)
		o.Link = nil
		if u := state.Judge(o); u.Filtered != v.Filtered || u.Reason != v.Reason {
			e.t.Errorf("%s: with link info %v, from the record %v", name, v, u)
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return v
}

func (e *env) status() result {
	e.t.Helper()
	return e.cli(nil, "status", "--pin-path", e.pin)
}

func TestConfiguredInterfacesRecorded(t *testing.T) {
	e := newEnv(t)
	e.ns.AddVeth(t, "b0", "b1")
	e.mustLoad(nil, "-i", "b0", "--mode", "generic")
	recs := e.records()
	if len(recs) != 2 {
		t.Fatalf("records %v, want a0 and b0", recs)
	}
	for _, name := range []string{"a0", "b0"} {
		r := recs[name]
		ids := e.ids(name)
		if r.Ifindex != e.ifindex(name) || r.ProgramID != ids.program || r.Mode != loader.ModeGeneric || r.OperatorDetached {
			t.Errorf("%s: record %+v; ifindex %d, program %d", name, r, e.ifindex(name), ids.program)
		}
	}
	if r := e.status(); r.code != 0 || strings.HasPrefix(r.stdout, "NOT FILTERED") {
		t.Fatalf("status exited %d:\n%s", r.code, r.stdout)
	}

	// A load without b0 stops watching it, and leaves it attached.
	r := e.mustLoad(nil, "--mode", "generic", "--json")
	var res loader.Result
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if strings.Join(res.Unconfigured, ",") != "b0" {
		t.Errorf("unconfigured %v, want b0", res.Unconfigured)
	}
	if _, ok := e.records()["b0"]; ok {
		t.Error("b0 still configured")
	}
	if e.xdpProg("b0") == 0 {
		t.Error("b0 detached by a load that no longer names it")
	}
	if r := e.mustLoad(nil, "--mode", "generic", "--json"); strings.TrimSpace(r.stdout) != "{}" {
		t.Errorf("second identical load changed %s", r.stdout)
	}
}

func TestUnloadInterfaceKeepsItConfigured(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "a0"); r.code != 0 {
		t.Fatalf("unload -i exited %d: %s", r.code, r.stderr)
	}
	rec, ok := e.records()["a0"]
	if !ok || !rec.OperatorDetached {
		t.Fatalf("after unload -i: record %+v, present %v; want operator-detached", rec, ok)
	}
	if e.xdpProg("a0") != 0 {
		t.Fatal("a0 still runs XDP")
	}
	if v := e.verdict("a0"); v.Reason != state.UnfilteredOperatorDetached {
		t.Errorf("verdict %v", v)
	}
	r := e.status()
	if r.code != loader.ExitNotFiltered || !strings.HasPrefix(r.stdout, "NOT FILTERED: a0: operator-detached") {
		t.Fatalf("status exited %d, want %d:\n%s", r.code, loader.ExitNotFiltered, r.stdout)
	}

	// The next load attaches it again and clears the mark.
	e.mustLoad(nil)
	if rec := e.records()["a0"]; rec.OperatorDetached || e.xdpProg("a0") == 0 {
		t.Fatalf("after load: record %+v, xdp %d", rec, e.xdpProg("a0"))
	}
	if r := e.status(); r.code != 0 {
		t.Fatalf("status exited %d:\n%s", r.code, r.stdout)
	}

	// Unload without -i removes the record with everything else.
	if r := e.cli(nil, "unload", "--pin-path", e.pin); r.code != 0 {
		t.Fatalf("unload exited %d: %s", r.code, r.stderr)
	}
	if _, err := state.ReadInterfaces(e.pin); err == nil {
		t.Fatal("records survived unload")
	}
}

// TestFilteredDefinition drives a configured interface through each way
// of not being filtered that the kernel allows, with real devices.
func TestFilteredDefinition(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	if v := e.verdict("a0"); !v.Filtered {
		t.Fatalf("after load: %v", v)
	}

	e.ns.Run(t, "ip", "link", "del", "a0")
	if v := e.verdict("a0"); v.Reason != state.UnfilteredNoDevice {
		t.Errorf("deleted: %v", v)
	}
	e.ns.AddVeth(t, "a0", "a1")
	if v := e.verdict("a0"); v.Reason != state.UnfilteredDefunctLink {
		t.Errorf("re-created: %v", v)
	}
	r := e.status()
	if r.code != loader.ExitNotFiltered || !strings.HasPrefix(r.stdout, "NOT FILTERED: a0: defunct link") {
		t.Errorf("status exited %d:\n%s", r.code, r.stdout)
	}

	// Someone else's program on the new device.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	e.setXDP("a0", prog.FD())
	if v := e.verdict("a0"); v.Reason != state.UnfilteredForeignProgram {
		t.Errorf("foreign program: %v", v)
	}
	e.setXDP("a0", -1)

	e.mustLoad(nil) // replaces the defunct link
	if v := e.verdict("a0"); !v.Filtered {
		t.Fatalf("after reload: %v", v)
	}
	// Renamed away, another device renamed to the name.
	e.ns.AddVeth(t, "c0", "c1")
	e.ns.Run(t, "ip", "link", "set", "a0", "down")
	e.ns.Run(t, "ip", "link", "set", "a0", "name", "old0")
	e.ns.Run(t, "ip", "link", "set", "c0", "name", "a0")
	if v := e.verdict("a0"); v.Reason != state.UnfilteredDefunctLink || !strings.Contains(v.Detail, "attached to ifindex") {
		t.Errorf("renamed: %v", v)
	}
	e.mustLoad(nil)
	if err := os.Remove(state.LinkPath(e.pin, "a0")); err != nil {
		t.Fatal(err)
	}
	if v := e.verdict("a0"); v.Reason != state.UnfilteredNoLink {
		t.Errorf("pin removed: %v", v)
	}
}

func (e *env) ifindex(name string) int {
	e.t.Helper()
	var idx int
	if err := e.ns.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err == nil {
			idx = l.Attrs().Index
		}
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	return idx
}

// xdpProg is the XDP program attached to a device, 0 for none.
func (e *env) xdpProg(name string) uint32 {
	e.t.Helper()
	var id uint32
	if err := e.ns.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err == nil && l.Attrs().Xdp != nil && l.Attrs().Xdp.Attached {
			id = l.Attrs().Xdp.ProgId
		}
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	return id
}

// setXDP attaches a program the old way (netlink, no bpf_link), or
// detaches with fd -1.
func (e *env) setXDP(name string, fd int) {
	e.t.Helper()
	if err := e.ns.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkSetXdpFdWithFlags(l, fd, 2 /* XDP_FLAGS_SKB_MODE */)
	}); err != nil {
		e.t.Fatal(err)
	}
}
