// Package e2e runs the built binaries as an operator would, on network
// namespaces with real packets through real XDP.
package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// binDir holds the binaries built for this test run.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "aegis-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Readable by everyone: the least-privilege tests run the daemons as
	// an unprivileged user.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	binDir = dir
	root, err := filepath.Abs("..")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cmds, _ := filepath.Glob(filepath.Join(root, "cmd", "*"))
	builds := [][]string{{"build", "-o", dir + "/"}}
	for _, c := range cmds {
		builds[0] = append(builds[0], "./cmd/"+filepath.Base(c))
	}
	// The "next release" of the loader, for upgrade tests.
	builds = append(builds, []string{"build", "-tags", "aegis_nextbuild", "-o", filepath.Join(dir, "aegis-loader-next"), "./cmd/aegis-loader"})
	for _, args := range builds {
		cmd := exec.Command("go", args...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "go %s: %v\n%s", strings.Join(args, " "), err, out)
			return 1
		}
	}
	return m.Run()
}

// bin returns the path of a built binary.
func bin(name string) string { return filepath.Join(binDir, name) }

// gateway is a topology with the data path loaded on the gateway's public
// interface and its own pin directory.
type gateway struct {
	*tu.Topology
	t   *testing.T
	pin string
}

// newGateway builds a topology and runs "aegis-loader load" with args
// (which start with "load").
func newGateway(t *testing.T, loadArgs ...string) *gateway {
	t.Helper()
	g := &gateway{Topology: tu.NewTopology(t), t: t, pin: tu.PinDir(t)}
	g.loader(loadArgs...)
	return g
}

// loader runs aegis-loader in the gateway namespace with the test's pin
// path and the topology's interface and controller, failing t on error.
func (g *gateway) loader(args ...string) string {
	g.t.Helper()
	return g.run(bin("aegis-loader"), args...)
}

func (g *gateway) run(binary string, args ...string) string {
	g.t.Helper()
	// The test's own arguments come last so that they override these.
	full := []string{}
	if len(args) > 0 {
		full = append(full, args[0])
		if args[0] == "load" {
			full = append(full, "-i", tu.PublicIface, "-c", tu.ControllerV4.String(), "--group", "root")
		}
		full = append(full, "--pin-path", g.pin)
		full = append(full, args[1:]...)
	}
	out, err := g.Gateway.Command(binary, full...).CombinedOutput()
	if err != nil {
		g.t.Fatalf("%s %s: %v\n%s", filepath.Base(binary), strings.Join(full, " "), err, out)
	}
	return string(out)
}

func (g *gateway) maps() *state.Maps {
	g.t.Helper()
	m, err := state.Open(g.pin, state.OpenOptions{Writable: true})
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { m.Close() })
	return m
}

func (g *gateway) stats() [bpf.StatsSlots]state.Counter {
	g.t.Helper()
	m := g.maps()
	s, err := m.ReadStats()
	if err != nil {
		g.t.Fatal(err)
	}
	return s
}

func errAs(err error, target any) bool { return errors.As(err, target) }
