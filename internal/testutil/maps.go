package testutil

import (
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// PinMaps creates the data path's maps under dir with the given session
// capacity (0: the compiled default) and writes cfg to the config map, as
// the loader does, without loading or attaching the program. A zero
// cfg.DefaultIdleTimeout becomes one minute.
func PinMaps(t testing.TB, dir string, capacity uint32, cfg state.Config) {
	t.Helper()
	spec, err := bpf.LoadAegis()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	for _, name := range state.MapNames {
		ms := spec.Maps[name].Copy()
		if capacity != 0 && (name == state.MapSessionsV4 || name == state.MapSessionsV6) {
			ms.MaxEntries = capacity
		}
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatal(err)
		}
		if name == state.MapConfig {
			if cfg.DefaultIdleTimeout == 0 {
				cfg.DefaultIdleTimeout = time.Minute
			}
			v, err := cfg.Value()
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Put(uint32(0), &v); err != nil {
				t.Fatal(err)
			}
		}
		if err := m.Pin(state.MapPath(dir, name)); err != nil {
			t.Fatal(err)
		}
		m.Close()
	}
}
