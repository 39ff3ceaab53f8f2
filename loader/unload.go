package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/internal/state"
)

// ErrNotLoadedHere is returned by Unload when there is nothing to unload;
// the command treats it as success.
var ErrNotLoadedHere = errors.New("not loaded")

// Unload detaches the data path from the named interfaces. They stay
// configured, marked operator-detached: reported as not filtered, and not
// re-attached by aegis-loader watch until the next load. With no
// interfaces it detaches every one and removes all pins, dropping every
// session. Unloading what is not loaded returns ErrNotLoadedHere and
// changes nothing.
func (l *Loader) Unload(pinPath string, ifaces []string) (detached []string, err error) {
	if err := checkBPFFS(pinPath); err != nil {
		return nil, err
	}
	pd, err := lockPinDir(pinPath, 0, false, l.lockNotice(pinPath))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", pinPath, ErrNotLoadedHere)
	}
	if err != nil {
		return nil, err
	}
	defer pd.Unlock()

	linksDir := state.LinksPath(pinPath)
	targets := ifaces
	if len(targets) == 0 {
		if targets, err = state.LinkedInterfaces(pinPath); err != nil {
			return nil, err
		}
	}
	if len(ifaces) > 0 {
		if err := markDetached(pinPath, ifaces); err != nil {
			return nil, err
		}
	}
	for _, name := range targets {
		path := state.LinkPath(pinPath, name)
		ok, err := detachPinned(path)
		if err != nil {
			return detached, fmt.Errorf("detach %s: %w", name, err)
		}
		if err := l.detachEgress(pinPath, name); err != nil {
			return detached, err
		}
		if !ok {
			l.Log.Info().Str("iface", name).Msg("not attached; nothing to detach")
			continue
		}
		detached = append(detached, name)
		l.Log.Info().Str("iface", name).Msg("detached XDP program")
	}
	if len(ifaces) > 0 {
		l.syncGuard(pinPath)
		return detached, nil
	}
	if err := l.detachAllEgress(pinPath); err != nil {
		return detached, err
	}
	l.removeGuard()

	for _, path := range state.FilePins(pinPath) {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return detached, fmt.Errorf("remove pin: %w", err)
		}
	}
	if err := os.Remove(state.SweepLockPath(pinPath)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return detached, fmt.Errorf("remove pin: %w", err)
	}
	if err := os.Remove(linksDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return detached, fmt.Errorf("remove %s: %w", linksDir, err)
	}
	if err := os.Remove(pinPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return detached, fmt.Errorf("remove %s (is something else pinned there?): %w", pinPath, err)
	}
	l.Log.Info().Str("pin_path", pinPath).Msg("removed all pins")
	return detached, nil
}

// markDetached sets operator_detached on the records of the named
// interfaces that are configured, before they are detached, so that no
// observer ever takes the detach for a fault to repair.
func markDetached(pinPath string, names []string) error {
	records, err := state.OpenInterfaces(pinPath, true)
	if errors.Is(err, state.ErrNotLoaded) {
		return nil // pins of a loader that kept no record
	}
	if err != nil {
		return err
	}
	defer records.Close()
	for _, name := range names {
		r, ok, err := records.Get(name)
		if err != nil {
			return err
		}
		if !ok || r.OperatorDetached {
			continue
		}
		r.OperatorDetached = true
		if err := records.Put(r); err != nil {
			return err
		}
	}
	return nil
}

// detachPinned detaches the link pinned at path at once, even if another
// process still holds it open, and removes the pin. It reports false if
// nothing was pinned there.
func detachPinned(path string) (bool, error) {
	lk, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer lk.Close()
	if err := lk.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return false, err
	}
	// Without BPF_LINK_DETACH, removing the pin and closing the last fd
	// detaches it.
	if err := os.Remove(path); err != nil {
		return false, err
	}
	return true, nil
}
