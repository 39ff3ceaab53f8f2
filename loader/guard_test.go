package loader_test

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/aegis-agent/aegis/internal/guard"
	"github.com/aegis-agent/aegis/loader"
)

func (e *env) guard() (guard.State, bool) {
	e.t.Helper()
	var s guard.State
	var ok bool
	if err := e.ns.Do(func() (err error) { s, ok, err = guard.Read(); return err }); err != nil {
		e.t.Fatal(err)
	}
	return s, ok
}

func (e *env) guardStatus() loader.GuardStatus {
	e.t.Helper()
	r := e.cli(nil, "status", "--pin-path", e.pin, "--json")
	var st loader.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		e.t.Fatalf("status --json: %v\n%s", err, r.stdout)
	}
	return st.Guard
}

// TestGuardFollowsLoadAndUnload checks that every command that changes
// which interfaces are filtered leaves the guard matching the verdicts:
// load exempts the devices it attached, a re-created device is dropped
// with nothing running, unload -i lets its interface pass, unload removes
// the table.
func TestGuardFollowsLoadAndUnload(t *testing.T) {
	e := newEnv(t)
	e.ns.AddVeth(t, "b0", "b1")
	for range 2 { // a second load rewrites the same guard
		e.mustLoad(nil, "-i", "b0", "--mode", "generic")
		s, ok := e.guard()
		if !ok || !slices.Equal(s.Configured, []string{"a0", "b0"}) ||
			!slices.Equal(s.Filtered, slices.Sorted(slices.Values([]int{e.ifindex("a0"), e.ifindex("b0")}))) {
			t.Fatalf("guard after load: %+v (present %v); ifindexes a0 %d b0 %d", s, ok, e.ifindex("a0"), e.ifindex("b0"))
		}
	}
	if g := e.guardStatus(); !g.Present || len(g.Dropping) != 0 {
		t.Fatalf("status guard after load: %+v", g)
	}

	// b0 re-created, no watcher: its new ifindex is not exempt.
	e.ns.Run(t, "ip", "link", "del", "b0")
	e.ns.AddVeth(t, "b0", "b1")
	if g := e.guardStatus(); !slices.Equal(g.Dropping, []string{"b0"}) {
		t.Fatalf("status guard after re-creating b0: %+v", g)
	}
	if r := e.status(); r.code != loader.ExitNotFiltered {
		t.Fatalf("status exited %d:\n%s", r.code, r.stdout)
	}

	// unload -i: the operator's choice passes.
	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "b0"); r.code != 0 {
		t.Fatalf("unload -i exited %d: %s", r.code, r.stderr)
	}
	if s, _ := e.guard(); !slices.Equal(s.Configured, []string{"a0"}) {
		t.Fatalf("guard after unload -i b0: %+v", s)
	}
	if g := e.guardStatus(); len(g.Dropping) != 0 {
		t.Fatalf("status guard after unload -i b0: %+v", g)
	}

	if r := e.cli(nil, "unload", "--pin-path", e.pin); r.code != 0 {
		t.Fatalf("unload exited %d: %s", r.code, r.stderr)
	}
	if _, ok := e.guard(); ok {
		t.Fatal("guard table survived unload")
	}
}
