package loader_test

import (
	"encoding/json"
	"errors"
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/loader"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// golden compares got, with the test's pin path written PIN, with
// testdata/name.
func golden(t *testing.T, name, pin, got string) {
	t.Helper()
	got = strings.ReplaceAll(got, pin, "PIN")
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("%s differs:\n--- got\n%s--- want\n%s", name, got, want)
	}
}

// unload --json: each outcome is one object, and says what it did.
func TestUnloadJSON(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "-i", "a1")
	var out strings.Builder
	for _, c := range []struct {
		args []string
		want loader.CommandResult
	}{
		{[]string{"-i", "a0"}, loader.CommandResult{Result: loader.ResultDetached, PinPath: e.pin, Detached: []string{"a0"}}},
		{nil, loader.CommandResult{Result: loader.ResultUnloaded, PinPath: e.pin, Detached: []string{"a1"}}},
		{nil, loader.CommandResult{Result: loader.ResultNotLoaded, PinPath: e.pin}},
	} {
		r := e.cli(nil, append([]string{"unload", "--json", "--pin-path", e.pin}, c.args...)...)
		var got loader.CommandResult
		if err := json.Unmarshal([]byte(r.stdout), &got); r.code != 0 || err != nil || strings.Count(r.stdout, "\n") != 1 {
			t.Fatalf("unload --json %v: %+v (%v)", c.args, r, err)
		}
		if got.Result != c.want.Result || got.PinPath != c.want.PinPath || strings.Join(got.Detached, ",") != strings.Join(c.want.Detached, ",") {
			t.Errorf("unload --json %v: %+v, want %+v", c.args, got, c.want)
		}
		out.WriteString(r.stdout)
	}
	if e.xdpProgram("a0") != 0 || e.xdpProgram("a1") != 0 {
		t.Error("still attached after unload")
	}
	golden(t, "unload.json.golden", e.pin, out.String())
}

// confirm --json keeps the load waiting for confirmation, as confirm
// does, and prints one object; with nothing to confirm it fails and
// prints nothing on stdout.
func TestConfirmJSON(t *testing.T) {
	e := newEnv(t)
	pending := loader.Handshake(e.pin, "pending")
	if err := os.MkdirAll(filepath.Dir(pending), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pending, []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(pending) })
	r := e.cli(nil, "confirm", "--json", "--pin-path", e.pin)
	var got loader.CommandResult
	if err := json.Unmarshal([]byte(r.stdout), &got); r.code != 0 || err != nil || got.Result != loader.ResultConfirmed || got.PinPath != e.pin || got.Detached != nil {
		t.Fatalf("confirm --json: %+v (%v) %+v", r, err, got)
	}
	if _, err := os.Stat(pending); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the pending load is still waiting: %v", err)
	}
	golden(t, "confirm.json.golden", e.pin, r.stdout)
	if r := e.cli(nil, "confirm", "--json", "--pin-path", e.pin); r.code == 0 || r.stdout != "" || !strings.Contains(r.stderr, "no load is waiting") {
		t.Fatalf("confirm --json with nothing waiting: %+v", r)
	}
}
