package state

import (
	"fmt"
	"maps"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
)

// Handle gives a long-running process the pinned maps across the loader's
// lifecycle: it opens them on first use (so a daemon may start before the
// loader), and Refresh reopens them when an unload and a new load replaced
// the pins. Operations run under Do, which keeps the maps open for the
// duration of the call even if a Refresh swaps them meanwhile.
type Handle struct {
	pinPath string
	opts    OpenOptions
	log     zerolog.Logger

	mu   sync.RWMutex
	maps *Maps
	ids  map[string]ebpf.MapID // of every map of maps, by pin name
	// gen counts the opens, so that a cache of the maps' content (a
	// control plane with a store) sees that they were replaced. Atomic,
	// not under mu: it is read inside Do, where taking mu again would
	// deadlock against a waiting Refresh.
	gen atomic.Uint64
}

// NewHandle returns a handle on the maps pinned under pinPath. It does not
// open them yet.
func NewHandle(pinPath string, opts OpenOptions, log zerolog.Logger) *Handle {
	return &Handle{pinPath: pinPath, opts: opts, log: log}
}

// PinPath is the directory the handle opens.
func (h *Handle) PinPath() string { return h.pinPath }

// Do calls fn with the open maps, opening them first if needed. fn must not
// keep the maps after it returns. Returns the open error (ErrNotLoaded,
// ErrPermission, ErrIncompatible) without calling fn when the maps cannot
// be opened.
func (h *Handle) Do(fn func(*Maps) error) error {
	h.mu.RLock()
	if m := h.maps; m != nil {
		defer h.mu.RUnlock()
		return fn(m)
	}
	h.mu.RUnlock()

	if err := h.open(); err != nil {
		return err
	}
	return h.Do(fn)
}

func (h *Handle) open() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.maps != nil {
		return nil
	}
	m, err := Open(h.pinPath, h.opts)
	if err != nil {
		return err
	}
	ids, err := mapIDs(m)
	if err != nil {
		m.Close()
		return err
	}
	h.maps, h.ids = m, ids
	h.gen.Add(1)
	h.log.Info().Str("pin_path", h.pinPath).Uint32("sessions_v4_id", uint32(ids[MapSessionsV4])).Msg("opened pinned maps")
	return nil
}

// Refresh checks that the held maps are still the pinned ones, every one
// of them: a full unload and load replaces them all, and a load may
// replace one (a migration) or create one that was missing. When the pins
// are gone it closes the maps and returns ErrNotLoaded; when any was
// replaced it switches to the new set. Call it periodically.
//
// Whoever keeps a map of the set beyond a Do (a clone, a ring buffer
// reader) must follow the switch itself: compare its map's id with
// MapID's.
func (h *Handle) Refresh() error {
	pinned, err := pinnedIDs(h.pinPath)
	h.mu.Lock()
	current := h.maps != nil && err == nil && maps.Equal(pinned, h.ids)
	if h.maps != nil && !current {
		if err != nil {
			h.log.Warn().Err(err).Msg("pinned maps went away; closing them")
		} else {
			h.log.Warn().Msg("pinned maps were replaced; reopening")
		}
		h.maps.Close()
		h.maps = nil
	}
	h.mu.Unlock()
	if err != nil || current {
		return err
	}
	return h.open()
}

// Generation returns how many times the handle opened maps: it changes
// when the loader replaced them (an unload and a load make new, empty
// ones).
func (h *Handle) Generation() uint64 { return h.gen.Load() }

// Close releases the maps.
func (h *Handle) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.maps == nil {
		return nil
	}
	err := h.maps.Close()
	h.maps = nil
	return err
}

// MapID returns the id of the named map of the open set; 0 when none is
// open.
func (h *Handle) MapID(name string) ebpf.MapID {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.ids[name]
}

func pinnedIDs(pinPath string) (map[string]ebpf.MapID, error) {
	ids := make(map[string]ebpf.MapID, len(MapNames))
	for _, name := range MapNames {
		m, err := ebpf.LoadPinnedMap(MapPath(pinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, openError(MapPath(pinPath, name), err)
		}
		id, err := MapIDOf(m)
		m.Close()
		if err != nil {
			return nil, err
		}
		ids[name] = id
	}
	return ids, nil
}

func mapIDs(m *Maps) (map[string]ebpf.MapID, error) {
	ids := make(map[string]ebpf.MapID, len(MapNames))
	for _, s := range m.slots() {
		id, err := MapIDOf(*s.p)
		if err != nil {
			return nil, err
		}
		ids[s.name] = id
	}
	return ids, nil
}

// MapIDOf returns the kernel's id of a map.
func MapIDOf(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect %s: %w", m, err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, fmt.Errorf("inspect %s: kernel reports no map id", m)
	}
	return id, nil
}
