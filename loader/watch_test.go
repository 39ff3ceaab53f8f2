package loader_test

import (
	"context"
	"fmt"
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
func (e *env) startWatcher(resync time.Duration, setup ...func(*loader.Watcher)) (*loader.Watcher, *tu.Buffer) {
	e.t.Helper()
	logs := &tu.Buffer{}
	w := loader.New(zerolog.New(logs)).NewWatcher(e.pin, resync)
	for _, f := range setup {
		f(w)
	}
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

// TestWatchResyncsAfterOverrun: link events lost to a netlink overrun
// (ENOBUFS) end the subscription; the watcher subscribes again and
// resyncs, repairing an interface whose events were lost.
func TestWatchResyncsAfterOverrun(t *testing.T) {
	e := newEnv(t)
	e.ns.AddVeth(t, "b0", "b1")
	e.mustLoad(nil, "-i", "b0")
	// A one-event queue and the smallest receive buffer; an hour between
	// periodic resyncs, so that only the overrun path can repair a0.
	w, logs := e.startWatcher(time.Hour, func(w *loader.Watcher) { loader.SetEventBuffers(w, 1, 1) })

	// Hold the pin directory's lock: b0's repair blocks on it while the
	// events pile up.
	lock, err := state.LockDir(e.pin, true)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Unlock() // before the watcher's cleanup, which waits for it
	e.ns.Run(t, "ip", "link", "del", "b0")
	e.ns.AddVeth(t, "b0", "b1")
	time.Sleep(300 * time.Millisecond) // the watcher is in b0's repair
	var batch strings.Builder
	for i := range 50 {
		fmt.Fprintf(&batch, "link add flood%d type veth peer name flood%dp\n", i, i)
	}
	cmd := e.ns.Command("ip", "-batch", "-")
	cmd.Stdin = strings.NewReader(batch.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	e.ns.Run(t, "ip", "link", "del", "a0")
	e.ns.AddVeth(t, "a0", "a1")
	lock.Unlock()

	e.waitFor("two repairs", func() bool { return w.Repairs() == 2 })
	for _, name := range []string{"a0", "b0"} {
		if v := e.verdict(name); !v.Filtered {
			t.Errorf("%s: %v", name, v)
		}
	}
	// b0's repair may be counted before the loop takes the end of the
	// subscription from the channel.
	e.waitFor("the overrun to end the subscription", func() bool {
		return strings.Contains(logs.String(), "netlink subscription ended")
	})
	// a0's events come last, when the queue is long full: from the
	// overrun on, only the resync can have repaired a0. (On a loaded
	// machine the watcher may not have reached b0's events before the
	// flood, and then a0's events can arrive before the overrun, and
	// repair it as events.)
	overrun := false
	for _, l := range logs.Records(t) {
		switch l["message"] {
		case "netlink link events", "netlink subscription ended":
			overrun = true
		case "re-attached XDP program":
			if l["iface"] == "a0" && overrun && l["cause"] != "resubscribe" {
				t.Errorf("a0 repaired by %v after the overrun, want the resync", l["cause"])
			}
		}
	}
}
