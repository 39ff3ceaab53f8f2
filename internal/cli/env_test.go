package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/internal/binaries"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/loader"
)

// flagEnv is one flag reading one variable.
type flagEnv struct {
	binary, command string
	name, typ, help string
	env             string
}

func (f flagEnv) String() string {
	return fmt.Sprintf("%s --%s (%s, %q)", f.command, f.name, f.typ, f.help)
}

// envFlags walks the model of a binary's parser.
func envFlags(t *testing.T, binary string, k *kong.Kong) []flagEnv {
	t.Helper()
	var out []flagEnv
	var walk func(n *kong.Node)
	walk = func(n *kong.Node) {
		for _, f := range n.Flags {
			for _, env := range f.Envs {
				out = append(out, flagEnv{binary, n.FullPath(), f.Name, f.Target.Type().String(), f.Help, env})
			}
		}
		for _, c := range n.Children {
			walk(c)
		}
	}
	walk(k.Model.Node)
	return out
}

// sharedSettings are variables that flags of different help text may
// share: one setting that several binaries read by design, each flag
// describing it for its binary.
var sharedSettings = map[string]string{
	"AEGIS_PIN_PATH":  "the pin directory of the loader, the control plane and the reaper",
	"AEGIS_GRPC_PORT": "the agent's gRPC port: the loader's bypass for the controller, the control plane's listener",
}

// collisions reports every variable read by flags that are not the same
// setting. Two flags are the same setting if they have the same name and
// type and either the same help or a variable of sharedSettings.
func collisions(flags []flagEnv) []string {
	byEnv := map[string][]flagEnv{}
	for _, f := range flags {
		byEnv[f.env] = append(byEnv[f.env], f)
	}
	var out []string
	for env, fs := range byEnv {
		for _, f := range fs[1:] {
			same := f.name == fs[0].name && f.typ == fs[0].typ
			if same && f.help != fs[0].help {
				_, same = sharedSettings[env]
			}
			if !same {
				out = append(out, fmt.Sprintf("%s: %v and %v", env, fs[0], f))
			}
		}
	}
	sort.Strings(out)
	return out
}

func allFlags(t *testing.T) []flagEnv {
	t.Helper()
	var all []flagEnv
	for _, b := range binaries.All {
		k, err := b.Parser(cli.IO{})
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, envFlags(t, b.Spec.Name, k)...)
	}
	return all
}

func TestNoEnvironmentVariableMeansTwoThings(t *testing.T) {
	all := allFlags(t)
	if len(all) < 40 {
		t.Fatalf("only %d flags read the environment: the walk misses some", len(all))
	}
	for _, c := range collisions(all) {
		t.Error(c)
	}
	for _, f := range all {
		wantPrefix := "AEGIS_"
		if f.binary == "aegisctl" {
			wantPrefix = "AEGISCTL_"
		}
		if !strings.HasPrefix(f.env, wantPrefix) {
			t.Errorf("%v reads %s: %s reads %s* only", f, f.env, f.binary, wantPrefix)
		}
	}
	for env := range sharedSettings {
		if !slices.ContainsFunc(all, func(f flagEnv) bool { return f.env == env }) {
			t.Errorf("shared setting %s is read by no flag: remove it from the list", env)
		}
	}
}

// aegisctl reads the environment for its settings only: what a flag does
// from a variable left in a shell must never be an action.
func TestAegisctlReadsOnlySettings(t *testing.T) {
	settings := []string{"address", "config", "dir", "insecure", "log-format", "log-level", "pin-path",
		"profile", "server-name", "timeout", "tls-ca", "tls-cert", "tls-key"}
	k, err := aegisctl.Spec().New(&aegisctl.CLI{}, cli.IO{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range envFlags(t, "aegisctl", k) {
		if !slices.Contains(got, f.name) {
			got = append(got, f.name)
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, settings) {
		t.Fatalf("aegisctl flags reading the environment: %v, want %v", got, settings)
	}
}

// The check catches the scheme it replaced, where every aegisctl flag read
// AEGIS_<FLAG> like the daemons'.
func TestCollisionsOfTheOldScheme(t *testing.T) {
	old := aegisctl.Spec()
	old.EnvPrefix, old.EveryFlag = "AEGIS", true
	ctl, err := old.New(&aegisctl.CLI{}, cli.IO{})
	if err != nil {
		t.Fatal(err)
	}
	ld, err := loader.Spec().New(&loader.CLI{}, cli.IO{})
	if err != nil {
		t.Fatal(err)
	}
	found := collisions(append(envFlags(t, "aegis-loader", ld), envFlags(t, "aegisctl", ctl)...))
	for _, want := range []string{"AEGIS_PORT: ", "AEGIS_USER: ", "AEGIS_FORCE: ", "AEGIS_IP: "} {
		if !slices.ContainsFunc(found, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("no collision reported for %s in %v", want, found)
		}
	}
}

// Every variable a command reads is in its --help, which is where an
// operator looks, and from which the reference in docs/operations.md is
// generated.
func TestHelpNamesEveryVariable(t *testing.T) {
	for _, b := range binaries.All {
		k, err := b.Parser(cli.IO{})
		if err != nil {
			t.Fatal(err)
		}
		for _, path := range binaries.Commands(k) {
			var out, errb bytes.Buffer
			args := append(slices.Clone(path), "--help")
			if code := b.Main(context.Background(), args, cli.IO{Stdout: &out, Stderr: &errb}); code != 0 {
				t.Fatalf("%s %v: exit %d: %s", b.Spec.Name, args, code, errb.String())
			}
			// The flags of the command: those of each node on its path.
			nodes := []*kong.Node{k.Model.Node}
			for _, name := range path {
				n := nodes[len(nodes)-1]
				i := slices.IndexFunc(n.Children, func(c *kong.Node) bool { return c.Name == name })
				nodes = append(nodes, n.Children[i])
			}
			checked := 0
			for _, n := range nodes {
				for _, f := range n.Flags {
					for _, env := range f.Envs {
						checked++
						if !strings.Contains(out.String(), "$"+env) {
							t.Errorf("%s %s --help does not name $%s (--%s)", b.Spec.Name, strings.Join(path, " "), env, f.Name)
						}
					}
				}
			}
			if checked == 0 {
				t.Errorf("%s %s: no variable checked", b.Spec.Name, strings.Join(path, " "))
			}
		}
	}
}
