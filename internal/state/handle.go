package state

import (
	"fmt"
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
	ids  [2]ebpf.MapID // sessions_v4, sessions_v6 of maps
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
	ids, err := mapIDs(m.SessionsV4, m.SessionsV6)
	if err != nil {
		m.Close()
		return err
	}
	h.maps, h.ids = m, ids
	h.gen.Add(1)
	h.log.Info().Str("pin_path", h.pinPath).Uint32("sessions_v4_id", uint32(ids[0])).Msg("opened pinned maps")
	return nil
}

// Refresh checks that the held maps are still the pinned ones. When the
// pins are gone it closes the maps and returns ErrNotLoaded; when they were
// replaced it switches to the new ones. Call it periodically.
func (h *Handle) Refresh() error {
	pinned, err := pinnedIDs(h.pinPath)
	h.mu.Lock()
	current := h.maps != nil && err == nil && pinned == h.ids
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

func pinnedIDs(pinPath string) ([2]ebpf.MapID, error) {
	var maps []*ebpf.Map
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	for _, name := range []string{MapSessionsV4, MapSessionsV6} {
		m, err := ebpf.LoadPinnedMap(MapPath(pinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return [2]ebpf.MapID{}, openError(MapPath(pinPath, name), err)
		}
		maps = append(maps, m)
	}
	return mapIDs(maps[0], maps[1])
}

func mapIDs(v4, v6 *ebpf.Map) ([2]ebpf.MapID, error) {
	var ids [2]ebpf.MapID
	for i, m := range []*ebpf.Map{v4, v6} {
		info, err := m.Info()
		if err != nil {
			return ids, fmt.Errorf("inspect %s: %w", m, err)
		}
		id, ok := info.ID()
		if !ok {
			return ids, fmt.Errorf("inspect %s: kernel reports no map id", m)
		}
		ids[i] = id
	}
	return ids, nil
}
