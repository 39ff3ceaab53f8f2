package testutil

import (
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// PinOptions shape the maps PinMaps creates.
type PinOptions struct {
	// Capacity of each sessions map; 0 keeps the build's default.
	Capacity uint32
	// DefaultIdleTimeout written to the config map; 0 for one minute.
	DefaultIdleTimeout time.Duration
	// TombCapacity of each tombstone map; 0 for Capacity, as the loader
	// does.
	TombCapacity uint32
}

// PinMaps creates the data path's maps and pins them under dir as the
// loader would (without a program or links), with a config holding the
// default idle timeout, for tests of the processes that open the pins.
func PinMaps(t testing.TB, dir string, opts PinOptions) {
	t.Helper()
	RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	if opts.Capacity != 0 {
		spec.Maps[state.MapSessionsV4].MaxEntries = opts.Capacity
		spec.Maps[state.MapSessionsV6].MaxEntries = opts.Capacity
		spec.Maps[state.MapTombsV4].MaxEntries = opts.Capacity
		spec.Maps[state.MapTombsV6].MaxEntries = opts.Capacity
	}
	if opts.TombCapacity != 0 {
		spec.Maps[state.MapTombsV4].MaxEntries = opts.TombCapacity
		spec.Maps[state.MapTombsV6].MaxEntries = opts.TombCapacity
	}
	if opts.DefaultIdleTimeout == 0 {
		opts.DefaultIdleTimeout = time.Minute
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := state.EnsureSweepLock(dir, 0); err != nil {
		t.Fatal(err)
	}
	for _, name := range state.MapNames {
		m, err := ebpf.NewMap(spec.Maps[name])
		if err != nil {
			t.Fatal(err)
		}
		if name == state.MapConfig {
			cfg := state.Config{DefaultIdleTimeout: opts.DefaultIdleTimeout, GRPCPort: 50001}
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
