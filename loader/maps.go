package loader

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// pinMode is the file mode of each pin: the daemons (group aegis) write
// sessions and only read the rest; nothing is world-accessible.
func pinMode(name string) uint32 {
	if state.DaemonWritable(name) {
		return 0o660
	}
	return 0o640
}

// openOrCreateMaps opens each pinned map, checking it against spec, and
// creates and pins the missing ones. An existing map is never replaced.
func (l *Loader) openOrCreateMaps(spec *ebpf.CollectionSpec, pd *pinDir, gid int, res *Result) (*state.Maps, error) {
	pinPath := pd.path
	maps := &state.Maps{PinPath: pinPath}
	for _, name := range state.MapNames {
		ms := spec.Maps[name]
		path := state.MapPath(pinPath, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		switch {
		case err == nil:
			if err := checkPinnedMap(ms, m, path); err != nil {
				m.Close()
				maps.Close()
				return nil, err
			}
		case errors.Is(err, fs.ErrNotExist):
			if m, err = ebpf.NewMap(ms); err != nil {
				maps.Close()
				return nil, fmt.Errorf("create map %s: %w", name, err)
			}
			if err := m.Pin(path); err != nil {
				m.Close()
				maps.Close()
				return nil, fmt.Errorf("pin map %s: %w", path, err)
			}
			res.CreatedMaps = append(res.CreatedMaps, name)
			l.Log.Info().Str("map", name).Uint32("capacity", m.MaxEntries()).Msg("created map")
		default:
			maps.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		maps.Set(name, m)
		if err := setPinOwner(pd.fd(), path, gid, pinMode(name)); err != nil {
			maps.Close()
			return nil, err
		}
	}
	return maps, nil
}

// checkLayoutVersion refuses pins written with another layout version.
func checkLayoutVersion(pinPath string) error {
	switch v, _, err := state.PinnedLayoutVersion(pinPath); {
	case err != nil:
		return err
	case v == 0, v == bpf.LayoutVersion: // 0: created, config not yet written
		return nil
	default:
		return fmt.Errorf("%w: the maps under %s have layout version %d and this aegis-loader writes version %d, with no migration between them: run the aegis-loader that made them, or \"aegis-loader unload\" to start empty (drops every session)",
			ErrIncompatible, pinPath, v, bpf.LayoutVersion)
	}
}

// checkPinnedMap refuses a pinned map this build cannot use as it is.
func checkPinnedMap(ms *ebpf.MapSpec, m *ebpf.Map, path string) error {
	if ms.Name == state.MapSessionsV4 || ms.Name == state.MapSessionsV6 {
		if m.MaxEntries() != ms.MaxEntries {
			return fmt.Errorf("%w: %s holds up to %d sessions, --max-sessions asks for %d: load with --max-sessions %d to keep the sessions, or run \"aegis-loader unload\" first (which drops them)",
				ErrCapacityChange, path, m.MaxEntries(), ms.MaxEntries, m.MaxEntries())
		}
	}
	if err := ms.Compatible(m); err != nil {
		return fmt.Errorf("%w: %s: %v: this build cannot use the pinned map; run the previous aegis-loader, or \"aegis-loader unload\" to start empty",
			ErrIncompatible, path, err)
	}
	if err := checkBTFLayout(ms, m); errors.Is(err, errBTFUnreadable) {
		// Reading a map's BTF needs CAP_SYS_ADMIN, which the loader's unit
		// does not grant; the layout version covers this case.
	} else if err != nil {
		return fmt.Errorf("%w: %s: %v: this build cannot use the pinned map; run the previous aegis-loader, or \"aegis-loader unload\" to start empty",
			ErrIncompatible, path, err)
	}
	return nil
}
