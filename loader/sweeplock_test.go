package loader_test

import (
	"os"
	"testing"

	"github.com/aegis-agent/aegis/internal/state"
)

// A load over the pins of a release without the sweep sequence and the
// sweep lock (an upgrade) creates both and keeps the sessions.
func TestLoadAddsSweepStateToOlderPins(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil)
	e.grant(testSession)
	if err := os.Remove(state.MapPath(e.pin, state.MapSweepSeq)); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(state.SweepLockPath(e.pin)); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Open(e.pin, state.OpenOptions{}); err == nil {
		t.Fatal("opened pins without the sweep sequence")
	}
	e.mustLoad(nil)
	for path, mode := range map[string]os.FileMode{
		state.MapPath(e.pin, state.MapSweepSeq): 0o660,
		state.SweepLockPath(e.pin):              0o750 | os.ModeDir,
	} {
		if fi, err := os.Stat(path); err != nil || fi.Mode() != mode {
			t.Fatalf("%s after the upgrade: %v, want mode %v", path, err, mode)
		}
	}
	e.mustHaveSession(testSession)
}
