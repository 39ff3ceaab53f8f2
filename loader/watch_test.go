package loader_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
)

// startWatcher runs a watcher in the namespace until the test ends.
func (e *env) startWatcher(resync time.Duration) (*loader.Watcher, *tu.Buffer) {
	e.t.Helper()
	logs := &tu.Buffer{}
	w := loader.New(zerolog.New(logs)).NewWatcher(e.pin, resync)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.ns.Do(func() error { return w.Run(ctx) }) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			e.t.Error(err)
		}
		if e.t.Failed() {
			e.t.Logf("watcher log:\n%s", logs.String())
		}
	})
	e.waitFor("the watcher to start", func() bool { return strings.Contains(logs.String(), "watching configured interfaces") })
	return w, logs
}

func (e *env) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWatchLeavesForeignProgram: a device renamed to the configured name
// with someone else's XDP program is reported, not overwritten; once that
// program is gone, the watcher attaches ours.
func TestWatchLeavesForeignProgram(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	w, logs := e.startWatcher(200 * time.Millisecond)

	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	e.ns.AddVeth(t, "n0", "n1")
	e.setXDP("n0", prog.FD())
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.Run(t, "ip", "link", "set", "n0", "name", "a0")
	e.waitFor("the foreign program to be reported", func() bool {
		return strings.Contains(logs.String(), "foreign program")
	})
	time.Sleep(500 * time.Millisecond) // two resyncs
	if v := e.verdict("a0"); v.Reason != state.UnfilteredForeignProgram {
		t.Fatalf("verdict %v", v)
	}
	if n := strings.Count(logs.String(), "foreign program"); n != 1 {
		t.Errorf("the foreign program was reported %d times, want once", n)
	}
	if w.Repairs() != 0 {
		t.Fatalf("%d repairs over a foreign program", w.Repairs())
	}

	e.setXDP("a0", -1)
	e.waitFor("a repair", func() bool { return w.Repairs() == 1 })
	if v := e.verdict("a0"); !v.Filtered {
		t.Errorf("after the repair: %v", v)
	}
}

// TestWatchSkipsOperatorDetached: after unload -i the watcher does not
// re-attach, even when the device is re-created; after load it does
// again.
func TestWatchSkipsOperatorDetached(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	w, _ := e.startWatcher(100 * time.Millisecond)
	if r := e.cli(nil, "unload", "--pin-path", e.pin, "-i", "a0"); r.code != 0 {
		t.Fatalf("unload -i: %s", r.stderr)
	}
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	time.Sleep(300 * time.Millisecond)
	if w.Repairs() != 0 || e.xdpProg("a0") != 0 {
		t.Fatalf("operator-detached a0 re-attached (%d repairs)", w.Repairs())
	}
	e.mustLoad(nil)
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	e.waitFor("a repair", func() bool { return w.Repairs() == 1 })
	if v := e.verdict("a0"); !v.Filtered {
		t.Errorf("after the repair: %v", v)
	}
}
