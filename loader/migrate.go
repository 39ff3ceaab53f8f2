package loader

// Upgrades across layout versions.
//
// The config map's first field records the layout version of the pins
// (bpf.LayoutVersion when this build wrote it). A load over pins of an
// older version is an upgrade in place, map by map:
//
//   - a map the older release did not have is created and pinned;
//   - a map whose layout is unchanged is reused as it is, entries and all;
//   - a map whose layout changed is migrated by the function the migrations
//     table holds for (the pins' version, the map's name): a new map of
//     this build's layout, filled from the old one or from the flags, is
//     pinned under a staging name (state.MapNextPath) beside the old one.
//     No map of a changed layout is ever recreated empty behind the
//     operator's back: without a table entry the load is refused.
//
// The config map is always rebuilt from the flags when the version changes
// (it is derived), so its pin is also the upgrade's commit point.
//
// The new program is loaded against the set (reused, created, staged
// maps), pinned beside the old program, and the links move to it with
// link.Update: that is the only moment the data path changes, atomically
// per interface. Until then the old program runs on the old maps and the
// staged maps are read by nothing. Then the staged pins are renamed over
// the old ones, the config's last, so the pins announce the new version
// only once every map under them is the new program's. The old maps go
// away with the last reference (the old program; a daemon still holding
// one).
//
// A load that stops anywhere is finished by the next: the version is still
// the old one, so the staged maps are rebuilt (maps already renamed into
// place have this build's layout and are reused), a fresh program is loaded
// against them and every link moves to it. A load that fails removes its
// staged pins; links that had already moved keep their maps through their
// program.
//
// A migrated sessions map is copied before the switch and caught up after
// it (records), but daemons of the old release keep writing to the old map
// until they are restarted: the operator restarts them after the loader.
// Maps whose layout is unchanged, the sessions maps so far, are the same
// kernel objects before and after, so the old daemons keep working.
//
// Pins of a newer version are refused: this build cannot know their
// layout, and the one line says the pins come from a later release.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// migrationKey names one migration: the map called name, as pinned by a
// release of layout version from.
type migrationKey struct {
	from uint32
	name string
}

// A migration turns a pinned map of an older layout into a map of this
// build's layout.
type migration struct {
	// build returns a new, unpinned map made from spec and holding what
	// must survive of old. The data path still runs on old meanwhile.
	build func(l *Loader, old *ebpf.Map, spec *ebpf.MapSpec) (*ebpf.Map, error)
	// catchUp, if set, runs once the links run the new program: nothing
	// reads old any more, and catchUp brings next up to date with what
	// changed in old since build (grants and revokes made meanwhile).
	catchUp func(l *Loader, old, next *ebpf.Map) error
}

// migrations holds every layout change this build carries pins across.
// An entry converts the map as pinned by layout version from directly to
// this build's layout, with derived (the maps the loader writes from its
// flags: config, allow_v4, allow_v6), counters (stats) or records(convert)
// (sessions, with a function converting one entry). When a
// layout change bumps the version, add an entry for each map whose layout
// changed, keyed by the version it changed from, and check the entries of
// older versions still produce this build's layout (or drop them, ending
// the upgrade path from there). Maps whose layout did not change need no
// entry: they are reused.
//
// The config map needs none: it is derived, and rebuilt on every version
// change (see migrationFor). That is all layout 2 changed of layout 1's
// maps (config_value grew the flow-tracking fields); its new maps, flows
// and fragments, are created.
var migrations = map[migrationKey]migration{}

// derived is the migration of a map the loader writes from its flags on
// every load: a new empty map, which the load then fills.
var derived = migration{build: func(_ *Loader, _ *ebpf.Map, spec *ebpf.MapSpec) (*ebpf.Map, error) {
	return ebpf.NewMap(spec)
}}

// counters is the migration of the stats map when its slot count changed
// and its value layout did not: each slot's per-CPU counters are carried
// over (to the slots both maps have). Packets counted by the old program
// between the copy and the switch are not carried.
var counters = migration{build: func(l *Loader, old *ebpf.Map, spec *ebpf.MapSpec) (*ebpf.Map, error) {
	next, err := ebpf.NewMap(spec)
	if err != nil {
		return nil, err
	}
	if old.ValueSize() != next.ValueSize() || old.KeySize() != 4 {
		l.Log.Warn().Str("map", spec.Name).Msg("counter layout changed: counters start from zero")
		return next, nil
	}
	perCPU := reflect.New(reflect.SliceOf(reflect.ArrayOf(int(old.ValueSize()), reflect.TypeFor[byte]())))
	for slot := uint32(0); slot < min(old.MaxEntries(), next.MaxEntries()); slot++ {
		if err := old.Lookup(slot, perCPU.Interface()); err != nil {
			next.Close()
			return nil, fmt.Errorf("read %s slot %d: %w", spec.Name, slot, err)
		}
		if err := next.Put(slot, perCPU.Elem().Interface()); err != nil {
			next.Close()
			return nil, fmt.Errorf("write %s slot %d: %w", spec.Name, slot, err)
		}
	}
	return next, nil
}}

// convertFunc turns one entry of an old layout into this build's, in
// place or into new slices; ok=false drops the entry.
type convertFunc func(key, value []byte) (newKey, newValue []byte, ok bool, err error)

// records is the migration of a map of records (sessions) whose key or
// value layout changed: every entry is converted and copied, batch by
// batch, into the new map before the switch, and once more after it, when
// entries deleted from the old map meanwhile are deleted from the new one
// too, so that a revoke made during the upgrade is not undone. The second
// copy overwrites what the new program refreshed in the moments since the
// switch with the old map's values, older by as much: a session's last
// packet can only seem that much (milliseconds) earlier.
func records(convert convertFunc) migration {
	return migration{
		build: func(_ *Loader, old *ebpf.Map, spec *ebpf.MapSpec) (*ebpf.Map, error) {
			next, err := ebpf.NewMap(spec)
			if err != nil {
				return nil, err
			}
			if _, err := copyRecords(old, next, convert); err != nil {
				next.Close()
				return nil, err
			}
			return next, nil
		},
		catchUp: func(_ *Loader, old, next *ebpf.Map) error {
			seen, err := copyRecords(old, next, convert)
			if err != nil {
				return err
			}
			var stale [][]byte
			if err := eachRecord(next, func(k, _ []byte) error {
				if !seen[string(k)] {
					stale = append(stale, append([]byte(nil), k...))
				}
				return nil
			}); err != nil {
				return err
			}
			for _, k := range stale {
				if err := next.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return fmt.Errorf("delete %s entry: %w", next, err)
				}
			}
			return nil
		},
	}
}

// migrationBatch is the number of entries moved per batch syscall.
const migrationBatch = 4096

// rawBatch returns a slice of n fixed-size byte arrays of size bytes each,
// which the batch syscalls accept as n keys or values.
func rawBatch(n int, size uint32) reflect.Value {
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n)
}

// eachRecord batch-reads m and calls fn with each entry's bytes, valid
// only during the call.
func eachRecord(m *ebpf.Map, fn func(k, v []byte) error) error {
	keys, vals := rawBatch(migrationBatch, m.KeySize()), rawBatch(migrationBatch, m.ValueSize())
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys.Interface(), vals.Interface(), nil)
		for i := range n {
			if err := fn(keys.Index(i).Bytes(), vals.Index(i).Bytes()); err != nil {
				return err
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", m, err)
		}
	}
}

// copyRecords converts every entry of old into next with batch updates and
// returns the set of next's keys it wrote.
func copyRecords(old, next *ebpf.Map, convert convertFunc) (map[string]bool, error) {
	seen := make(map[string]bool)
	keys, vals := rawBatch(migrationBatch, next.KeySize()), rawBatch(migrationBatch, next.ValueSize())
	n := 0
	flush := func() error {
		if n == 0 {
			return nil
		}
		if _, err := next.BatchUpdate(keys.Slice(0, n).Interface(), vals.Slice(0, n).Interface(), nil); err != nil {
			return fmt.Errorf("write %s: %w", next, err)
		}
		n = 0
		return nil
	}
	err := eachRecord(old, func(k, v []byte) error {
		nk, nv, ok, err := convert(k, v)
		if err != nil {
			return fmt.Errorf("convert %s entry: %w", old, err)
		}
		if !ok {
			return nil
		}
		if len(nk) != int(next.KeySize()) || len(nv) != int(next.ValueSize()) {
			return fmt.Errorf("convert %s entry: %d-byte key and %d-byte value for a map of %d and %d",
				old, len(nk), len(nv), next.KeySize(), next.ValueSize())
		}
		copy(keys.Index(n).Bytes(), nk)
		copy(vals.Index(n).Bytes(), nv)
		seen[string(nk)] = true
		if n++; n == migrationBatch {
			return flush()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return seen, flush()
}

// pinnedVersion returns the layout version of the pins, 0 for none (or a
// config never written). Returns an error wrapping ErrIncompatible for
// pins of a newer release, which this build cannot read.
func pinnedVersion(pinPath string) (uint32, error) {
	v, _, err := state.PinnedLayoutVersion(pinPath)
	if err != nil {
		return 0, err
	}
	if v > bpf.LayoutVersion {
		return 0, fmt.Errorf("%w: the pins under %s have layout version %d, newer than this aegis-loader's %d: they were made by a later release; run that release's aegis-loader (a downgrade is \"aegis-loader unload\", which drops every session, then load)",
			ErrIncompatible, pinPath, v, bpf.LayoutVersion)
	}
	return v, nil
}

// staged is a map of this build's layout that replaces a pinned one once
// the links run the new program.
type staged struct {
	name string
	old  *ebpf.Map
	next *ebpf.Map
	mig  migration
}

// upgrade is what a load over older pins has staged.
type upgrade struct {
	from   uint32
	staged []staged
}

// replacing reports whether the load replaces any pinned map, so that
// the program must be loaded afresh against the new maps even if the
// pinned one is this build.
func (u *upgrade) replacing() bool { return u != nil && len(u.staged) > 0 }

func (u *upgrade) close() {
	if u == nil {
		return
	}
	for _, s := range u.staged {
		s.old.Close()
	}
}

// migrationFor returns the migration of the pinned map name, of layout
// version from, if it must be replaced: the config on any version change,
// another map when it has an entry in the table and is not already of
// this build's layout (an interrupted upgrade renamed it into place).
func migrationFor(from uint32, name string, ms *ebpf.MapSpec, m *ebpf.Map, path string) (migration, bool) {
	if from == 0 || from == bpf.LayoutVersion {
		return migration{}, false
	}
	mig, ok := migrations[migrationKey{from, name}]
	if name == state.MapConfig {
		if !ok {
			mig = derived
		}
		return mig, true
	}
	if !ok {
		return migration{}, false
	}
	if err := checkPinnedMap(ms, m, path); err == nil {
		return migration{}, false
	}
	return mig, true
}

// stage builds the migrated copy of a pinned map and pins it under its
// staging name. The old map stays pinned and in use.
func (l *Loader) stage(u *upgrade, mig migration, ms *ebpf.MapSpec, old *ebpf.Map, pd *pinDir, gid int) (*ebpf.Map, error) {
	path := state.MapNextPath(pd.path, ms.Name)
	_ = os.Remove(path) // left by an interrupted upgrade
	next, err := mig.build(l, old, ms)
	if err != nil {
		return nil, fmt.Errorf("migrate map %s from layout version %d: %w", ms.Name, u.from, err)
	}
	if err := next.Pin(path); err != nil {
		next.Close()
		return nil, fmt.Errorf("pin map %s: %w", path, err)
	}
	if err := setPinOwner(pd.fd(), path, gid, pinMode(ms.Name)); err != nil {
		next.Close()
		_ = os.Remove(path)
		return nil, err
	}
	u.staged = append(u.staged, staged{name: ms.Name, old: old, next: next, mig: mig})
	l.Log.Info().Str("map", ms.Name).Uint32("from_layout", u.from).Uint32("to_layout", bpf.LayoutVersion).
		Msg("staged migrated map")
	return next, nil
}

// commit renames the staged pins over the old ones, the config's last,
// once the links run the program that uses the staged maps. Returns the
// names of the maps replaced.
func (l *Loader) commit(u *upgrade, pd *pinDir) ([]string, error) {
	if !u.replacing() {
		return nil, nil
	}
	order := make([]staged, 0, len(u.staged))
	var config *staged
	for i := range u.staged {
		if u.staged[i].name == state.MapConfig {
			config = &u.staged[i]
			continue
		}
		order = append(order, u.staged[i])
	}
	if config != nil {
		order = append(order, *config)
	}
	var names []string
	for _, s := range order {
		if s.mig.catchUp != nil {
			if err := s.mig.catchUp(l, s.old, s.next); err != nil {
				return names, fmt.Errorf("migrate map %s: %w", s.name, err)
			}
		}
		from, to := filepath.Base(state.MapNextPath(pd.path, s.name)), filepath.Base(state.MapPath(pd.path, s.name))
		if err := unix.Renameat(pd.fd(), from, pd.fd(), to); err != nil {
			return names, fmt.Errorf("replace map pin %s: %w", state.MapPath(pd.path, s.name), err)
		}
		names = append(names, s.name)
		l.Log.Info().Str("map", s.name).Uint32("from_layout", u.from).Msg("migrated map")
	}
	return names, nil
}

// abort removes the staged pins after a failed load. Links that already
// run the new program keep its maps alive through it; the next load
// rebuilds them.
func (u *upgrade) abort(pinPath string) {
	if u == nil {
		return
	}
	for _, s := range u.staged {
		_ = os.Remove(state.MapNextPath(pinPath, s.name))
	}
}
