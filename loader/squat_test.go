package loader_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/loader"
)

// These tests play an unprivileged user who gets at the bpffs root before
// the loader does. bpffs mounted without mode= has a 1777 root, so any user
// may create names in it; the loader must refuse every such name rather
// than chown, chmod or pin into it.

// nobody is the attacker's uid and gid.
const nobody = 65534

// mainEnv makes the test binary run aegis-loader instead of the tests, so
// that a test can run the real command as another user.
const mainEnv = "AEGIS_LOADER_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		os.Exit(loader.Main(context.Background(), os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr}))
	}
	os.Exit(m.Run())
}

// asNobody runs an attacker's command as uid and gid 65534.
func asNobody(t *testing.T, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("as uid %d: %s %s: %v\n%s", nobody, name, strings.Join(args, " "), err, out)
	}
}

// newSquatEnv is newEnv with the pin path on a bpffs of the test's own,
// mounted as bpffs is without mode= (a world-writable, sticky root), so that
// the attacker's steps do not depend on how the host's /sys/fs/bpf is
// mounted, and nothing another test does to the host's bpffs root changes
// them.
func newSquatEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	base, err := os.MkdirTemp("", "aegis-squat-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(base, "bpffs")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "bpf", "-o", "mode=1777", "bpf", root).CombinedOutput(); err != nil {
		t.Fatalf("mount bpffs: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", root).Run() })
	e.pin = filepath.Join(root, "aegis")
	return e
}

// attackerDir is a directory of the attacker's on bpffs, removed when t ends.
func attackerDir(t *testing.T, e *env) string {
	t.Helper()
	dir := e.pin + "-attacker"
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	asNobody(t, "mkdir", dir)
	return dir
}

// carelessPinDir creates the pin directory as root but writable by anyone,
// as an administrator's "chmod 777" would leave it.
func carelessPinDir(t *testing.T, e *env) {
	t.Helper()
	if err := os.Mkdir(e.pin, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(e.pin, 0o777); err != nil {
		t.Fatal(err)
	}
}

// snapshot describes path and everything under it (owner, group, mode,
// symlink target), without following symlinks.
func snapshot(t *testing.T, path string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		fmt.Fprintf(&b, "%s %d:%d %v", p, st.Uid, st.Gid, fi.Mode())
		if fi.Mode()&fs.ModeSymlink != 0 {
			target, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", target)
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestPinPathSquattingRefused(t *testing.T) {
	for _, c := range []struct {
		name string
		// setup plays the attacker; it returns the pin path to load at
		// and the place the attacker controls, which must not change.
		setup func(t *testing.T, e *env) (pinPath, target string)
		want  string
	}{
		{"pin directory created by another user", func(t *testing.T, e *env) (string, string) {
			asNobody(t, "mkdir", e.pin)
			return e.pin, e.pin
		}, "is owned by uid 65534, not root"},

		{"links is a symlink to the attacker's directory", func(t *testing.T, e *env) (string, string) {
			carelessPinDir(t, e)
			target := attackerDir(t, e)
			asNobody(t, "ln", "-s", target, state.LinksPath(e.pin))
			return e.pin, target
		}, state.LinksPath("") + " is a symbolic link"},

		{"links is a directory of another user", func(t *testing.T, e *env) (string, string) {
			carelessPinDir(t, e)
			asNobody(t, "mkdir", state.LinksPath(e.pin))
			return e.pin, state.LinksPath(e.pin)
		}, state.LinksPath("") + " is owned by uid 65534, not root"},

		{"the pin path is a symlink", func(t *testing.T, e *env) (string, string) {
			target := attackerDir(t, e)
			asNobody(t, "ln", "-s", target, e.pin)
			return e.pin, target
		}, "is a symbolic link"},

		{"a map pinned by another user", func(t *testing.T, e *env) (string, string) {
			carelessPinDir(t, e)
			// The attacker's own map, pinned under a map's name. An
			// unprivileged user can pin a map fd it holds wherever it may
			// create names, where the kernel lets it have one; here root
			// makes the map and hands the pin to the attacker.
			m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			pin := state.MapPath(e.pin, state.MapSessionsV4)
			if err := m.Pin(pin); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(pin, nobody, nobody); err != nil {
				t.Fatal(err)
			}
			return e.pin, pin
		}, state.MapSessionsV4 + " is owned by uid 65534, not root"},

		{"a world-writable parent without the sticky bit", func(t *testing.T, e *env) (string, string) {
			parent := e.pin + "-parent"
			t.Cleanup(func() { _ = os.RemoveAll(parent) })
			if err := os.Mkdir(parent, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(parent, 0o777); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(parent, "aegis"), parent
		}, "-parent is writable by other users and not sticky"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newSquatEnv(t)
			pinPath, target := c.setup(t, e)
			before := snapshot(t, target)
			r := e.cli(nil, "load", "--pin-path", pinPath, "-i", "a0", "--group", "root")
			if r.code != 1 {
				t.Fatalf("exit %d, want 1; stdout %q stderr %q", r.code, r.stdout, r.stderr)
			}
			last := lastLine(r.stderr)
			if !strings.HasPrefix(last, "aegis-loader: unsafe pin path: ") || !strings.Contains(last, c.want) {
				t.Fatalf("last stderr line %q, want one line with %q", last, c.want)
			}
			if after := snapshot(t, target); after != before {
				t.Fatalf("the load changed the attacker's place:\nbefore:\n%safter:\n%s", before, after)
			}
			if e.xdpProgram("a0") != 0 {
				t.Fatal("a refused load attached")
			}
			for _, p := range state.FilePins(pinPath) {
				if p == target {
					continue
				}
				if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("a refused load pinned %s", p)
				}
			}
		})
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// exeForNobody copies the test binary where uid 65534 may run it.
func exeForNobody(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "aegis-loader-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "aegis-loader")
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}

// A load by an unprivileged user fails before it creates anything: an
// empty directory it left would squat the pin path for the root loader.
func TestNonRootLoadCreatesNothing(t *testing.T) {
	e := newSquatEnv(t)
	cmd := exec.Command(exeForNobody(t), "load", "--pin-path", e.pin, "-i", "lo", "--group", "root")
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("load as uid %d: %v\n%s", nobody, err, out)
	}
	if last := lastLine(string(out)); !strings.HasPrefix(last, "aegis-loader: not running as root (uid 65534)") {
		t.Fatalf("last line %q, want the reason", last)
	}
	if _, err := os.Lstat(e.pin); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("an unprivileged load left %s behind: %v", e.pin, err)
	}
}

// A root load that fails before it pins anything removes the directories
// it created, parents included; one that succeeds leaves the parents it
// made traversable (0755) and nothing else.
func TestFailedLoadRemovesWhatItCreated(t *testing.T) {
	e := newSquatEnv(t)
	pinPath := filepath.Join(e.pin, "x", "aegis")
	brokenMap := func(l *loader.Loader) {
		l.Spec = func() (*ebpf.CollectionSpec, error) {
			spec, err := loader.New(l.Log).Spec()
			if err != nil {
				return nil, err
			}
			spec = spec.Copy()
			spec.Maps[state.MapSessionsV4].KeySize = 0 // the kernel refuses it
			return spec, nil
		}
	}
	r := e.cli(brokenMap, "load", "--pin-path", pinPath, "-i", "a0", "--group", "root")
	if r.code != 1 || !strings.Contains(lastLine(r.stderr), "create map "+state.MapSessionsV4) {
		t.Fatalf("%+v", r)
	}
	if _, err := os.Lstat(e.pin); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a failed load left %s behind: %v", e.pin, err)
	}

	if r := e.cli(nil, "load", "--pin-path", pinPath, "-i", "a0", "--group", "root"); r.code != 0 {
		t.Fatalf("%+v", r)
	}
	for _, dir := range []string{e.pin, filepath.Dir(pinPath)} {
		fi, err := os.Lstat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != fs.ModeDir|0o755 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
			t.Errorf("%s: %v uid %d, want 0755 root", dir, fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid)
		}
	}
}

// On a bpffs mounted as systemd does (mode=0700) the daemons, members of
// the pins' group and nothing more, cannot reach the pins; the load says
// so, and stops saying so once the root is searchable.
func TestUnsearchableBPFFSRootWarns(t *testing.T) {
	e := newEnv(t)
	base, err := os.MkdirTemp("", "aegis-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(base, "bpf")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "bpf", "-o", "mode=0700", "bpf", root).CombinedOutput(); err != nil {
		t.Fatalf("mount bpffs: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", root).Run() })
	pinPath := filepath.Join(root, "aegis")
	t.Cleanup(func() { _ = e.cli(nil, "unload", "--pin-path", pinPath) })

	const warning = "the pins' group may not search this directory"
	r := e.cli(nil, "load", "--pin-path", pinPath, "-i", "a0", "--group", "4242", "--log-format", "json")
	if r.code != 0 || !strings.Contains(r.stderr, warning) || !strings.Contains(r.stderr, `"dir":"`+root+`"`) {
		t.Fatalf("load on a mode=0700 bpffs: %+v", r)
	}
	if err := os.Chmod(root, 0o711); err != nil {
		t.Fatal(err)
	}
	if r := e.cli(nil, "load", "--pin-path", pinPath, "-i", "a0", "--group", "4242", "--log-format", "json"); r.code != 0 || strings.Contains(r.stderr, warning) {
		t.Fatalf("load on a mode=0711 bpffs: %+v", r)
	}
}

// Unload refuses a pin path that is not the loader's, rather than detach
// and remove what it leads to.
func TestUnloadRefusesSymlinkedPinPath(t *testing.T) {
	e := newSquatEnv(t)
	e.mustLoad(nil)
	alias := e.pin + "-alias"
	t.Cleanup(func() { _ = os.Remove(alias) })
	asNobody(t, "ln", "-s", e.pin, alias)
	before := snapshot(t, e.pin)
	r := e.cli(nil, "unload", "--pin-path", alias)
	if r.code != 1 || !strings.HasPrefix(lastLine(r.stderr), "aegis-loader: unsafe pin path: "+alias+" is a symbolic link") {
		t.Fatalf("%+v", r)
	}
	if after := snapshot(t, e.pin); after != before {
		t.Fatalf("unload through a symlink changed the pins:\nbefore:\n%safter:\n%s", before, after)
	}
	if e.xdpProgram("a0") == 0 {
		t.Fatal("unload through a symlink detached a0")
	}
}
