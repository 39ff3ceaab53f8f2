// Package testutil gives kernel tests their environment: a gate that skips
// them only where that is allowed, a private pin directory on bpffs, and
// network namespaces entered with setns on a locked OS thread.
package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// RequireKernelEnv is the environment variable that turns a kernel test
// that cannot run into a failure instead of a skip. CI sets it.
const RequireKernelEnv = "AEGIS_REQUIRE_KERNEL_TESTS"

// BPFFSRoot is where tests create their pin directories.
const BPFFSRoot = "/sys/fs/bpf"

// RequireKernel skips t unless the process can load BPF programs and use
// bpffs, or fails it if RequireKernelEnv=1. It never skips on an error
// that is not "this environment cannot run kernel tests".
func RequireKernel(t testing.TB) {
	t.Helper()
	if reason := kernelUnavailable(); reason != "" {
		if os.Getenv(RequireKernelEnv) == "1" {
			t.Fatalf("kernel test cannot run (%s) and %s=1", reason, RequireKernelEnv)
		}
		t.Skipf("kernel test skipped: %s (set %s=1 to make this a failure)", reason, RequireKernelEnv)
	}
}

func kernelUnavailable() string {
	if os.Geteuid() != 0 {
		return "not running as root"
	}
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		return "bpffs is not mounted at " + BPFFSRoot
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()},
	})
	if err != nil {
		return "cannot load an XDP program: " + err.Error()
	}
	prog.Close()
	return ""
}

// RandomName returns prefix followed by 8 random hex digits.
func RandomName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// PinDir returns a fresh, not yet existing path on bpffs for t's pins and
// removes whatever is pinned there when t ends.
func PinDir(t testing.TB) string {
	t.Helper()
	RequireKernel(t)
	dir := filepath.Join(BPFFSRoot, RandomName("aegis-test-"))
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// Netns is a named network namespace (/run/netns/Name) created for a test.
type Netns struct {
	Name string
}

// Path is the namespace's bind mount, for nsenter --net= or setns.
func (n *Netns) Path() string { return "/run/netns/" + n.Name }

// NewNetns creates a network namespace and deletes it when t ends.
func NewNetns(t testing.TB, prefix string) *Netns {
	t.Helper()
	RequireKernel(t)
	n := &Netns{Name: RandomName(prefix)}
	MustRun(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", n.Name).Run() })
	MustRun(t, "ip", "-n", n.Name, "link", "set", "lo", "up")
	return n
}

// AddVeth creates a veth pair a, b in the namespace and brings both up.
func (n *Netns) AddVeth(t testing.TB, a, b string) {
	t.Helper()
	n.Run(t, "ip", "link", "add", a, "type", "veth", "peer", "name", b)
	n.Run(t, "ip", "link", "set", a, "up")
	n.Run(t, "ip", "link", "set", b, "up")
}

// Do runs fn on an OS thread that has entered the namespace. Sockets that
// fn creates live in the namespace for their whole life.
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: after setns it is not fit for
		// other goroutines, so the runtime discards it when we return.
		runtime.LockOSThread()
		f, err := os.Open(n.Path())
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Thread is one OS thread that has entered a namespace, for callers that
// make many system calls there: Do starts (and discards) a thread per call.
type Thread struct {
	calls chan func()
}

// Thread starts a thread in the namespace; it ends when t ends.
func (n *Netns) Thread(t testing.TB) *Thread {
	t.Helper()
	th := &Thread{calls: make(chan func())}
	started := make(chan error, 1)
	go func() {
		// Never unlocked, as in Do: the runtime discards the thread.
		runtime.LockOSThread()
		f, err := os.Open(n.Path())
		if err == nil {
			err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
			f.Close()
		}
		started <- err
		if err != nil {
			return
		}
		for fn := range th.calls {
			fn()
		}
	}()
	if err := <-started; err != nil {
		t.Fatalf("enter %s: %v", n.Name, err)
	}
	t.Cleanup(func() { close(th.calls) })
	return th
}

// Do runs fn on the thread and returns when it has.
func (th *Thread) Do(fn func()) {
	done := make(chan struct{})
	th.calls <- func() { defer close(done); fn() }
	<-done
}

// Command returns cmd to run inside the namespace. It uses nsenter, not
// "ip netns exec", which would remount /sys and hide bpffs pins.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
}

// Run runs a command in the namespace and fails t on error.
func (n *Netns) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s in %s: %v\n%s", name, strings.Join(args, " "), n.Name, err, out)
	}
	return string(out)
}

// MustRun runs a command and fails t on error, returning its output.
func MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) || len(out) > 0 {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return string(out)
}
