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
// creates and pins the missing ones. An existing map is never replaced,
// except by a migration when the pins are of an older layout version
// (from; see migrate.go): the returned upgrade holds the staged maps,
// which are in the set in place of the pinned ones.
func (l *Loader) openOrCreateMaps(spec *ebpf.CollectionSpec, pd *pinDir, gid int, from uint32, res *Result) (_ *state.Maps, _ *upgrade, err error) {
	pinPath := pd.path
	maps := &state.Maps{PinPath: pinPath}
	u := &upgrade{from: from}
	defer func() {
		if err != nil {
			maps.Close()
			u.close()
			u.abort(pinPath)
		}
	}()
	for _, name := range state.MapNames {
		ms := spec.Maps[name]
		path := state.MapPath(pinPath, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		switch {
		case err == nil:
			if mig, ok := migrationFor(from, name, ms, m, path); ok {
				next, err := l.stage(u, mig, ms, m, pd, gid)
				if err != nil {
					m.Close()
					return nil, nil, err
				}
				maps.Set(name, next)
				continue
			}
			if err := checkPinnedMap(ms, m, path); err != nil {
				m.Close()
				if from != 0 && from != bpf.LayoutVersion && !errors.Is(err, ErrCapacityChange) {
					return nil, nil, fmt.Errorf("upgrade from layout version %d: no migration of map %s: %w", from, name, err)
				}
				return nil, nil, err
			}
		case errors.Is(err, fs.ErrNotExist):
			if m, err = ebpf.NewMap(ms); err != nil {
				return nil, nil, fmt.Errorf("create map %s: %w", name, err)
			}
			if err := m.Pin(path); err != nil {
				m.Close()
				return nil, nil, fmt.Errorf("pin map %s: %w", path, err)
			}
			res.CreatedMaps = append(res.CreatedMaps, name)
			l.Log.Info().Str("map", name).Uint32("capacity", m.MaxEntries()).Msg("created map")
		default:
			return nil, nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		maps.Set(name, m)
		if err := setPinOwner(pd.fd(), path, gid, pinMode(name)); err != nil {
			return nil, nil, err
		}
	}
	return maps, u, nil
}

// checkPinnedMap refuses a pinned map this build cannot use as it is.
func checkPinnedMap(ms *ebpf.MapSpec, m *ebpf.Map, path string) error {
	if ms.Name == state.MapSessionsV4 || ms.Name == state.MapSessionsV6 {
		if m.MaxEntries() != ms.MaxEntries {
			return fmt.Errorf("%w: %s holds up to %d sessions, --max-sessions asks for %d: load with --max-sessions %d to keep the sessions, or run \"aegis-loader unload\" first (which drops them)",
				ErrCapacityChange, path, m.MaxEntries(), ms.MaxEntries, m.MaxEntries())
		}
	}
	if ms.Name == state.MapTombsV4 || ms.Name == state.MapTombsV6 {
		// Sized with --max-sessions when created; the sessions maps'
		// check above refuses a change of it, and tombstones of a
		// previous size are as good.
		ms = ms.Copy()
		ms.MaxEntries = m.MaxEntries()
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
