package loader

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// attachAll makes every requested interface, and every interface already
// attached, run this build's program, pinned as state.ProgramPin.
//
// An upgrade loads the new build, pins it beside the old one, moves every
// link to it with link.Update (atomic per interface: each packet sees the
// old or the new program) and renames its pin over the old one. Should it
// stop half-way, the next load finds links on different programs and
// converges them. A failed upgrade removes its staged pin, as the links
// that moved hold the new program themselves.
//
// With replacing set, the set holds maps that replace pinned ones (a
// migration): the program is loaded afresh against them even when the
// pinned one is this build.
func (l *Loader) attachAll(spec *ebpf.CollectionSpec, maps *state.Maps, cfg *Config, ifaces map[string]int, replacing bool, res *Result) (err error) {
	progPath := state.ProgramPath(cfg.PinPath)
	nextPath := state.ProgramNextPath(cfg.PinPath)
	_ = os.Remove(nextPath) // left by an interrupted upgrade

	prog, fresh, err := l.currentProgram(spec, maps, progPath, replacing)
	if err != nil {
		return err
	}
	defer prog.Close()
	if fresh {
		if err := prog.Pin(nextPath); err != nil {
			return fmt.Errorf("pin program %s: %w", nextPath, err)
		}
		defer func() {
			if err != nil {
				_ = os.Remove(nextPath)
			}
		}()
		_ = os.Chmod(nextPath, 0o600)
	}
	progID, err := programID(prog)
	if err != nil {
		return err
	}
	records := state.NewInterfaces(maps.Ifaces)
	record := func(name string) error {
		return records.Put(state.Interface{Name: name, Ifindex: ifaces[name], ProgramID: progID, Mode: cfg.Mode})
	}

	temps, err := state.TempLinkPins(cfg.PinPath)
	if err != nil {
		return err
	}
	for _, path := range temps {
		_ = os.Remove(path) // left by an interrupted attach; never the live pin
	}
	linked, err := state.LinkedInterfaces(cfg.PinPath)
	if err != nil {
		return err
	}
	attached := make(map[string]bool)
	for _, name := range linked {
		path := state.LinkPath(cfg.PinPath, name)
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", path, err)
		}
		err = l.convergeLink(lk, path, name, ifaces, cfg, prog, progID, res)
		lk.Close()
		if errors.Is(err, errStaleLink) {
			continue // unpinned; attached afresh below if requested
		}
		if err != nil {
			return err
		}
		attached[name] = true
		if _, ok := ifaces[name]; !ok {
			l.Log.Warn().Str("iface", name).
				Msg("interface is attached but not in --iface; left attached and no longer watched (\"aegis-loader unload -i " + name + "\" detaches it)")
			continue
		}
		// Right after an upgrade's link.Update, so that a process that
		// may not open the link sees our new program id at once.
		if err := record(name); err != nil {
			return err
		}
	}

	names := make([]string, 0, len(ifaces))
	for name := range ifaces {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if attached[name] {
			continue
		}
		if err := l.attach(prog, name, ifaces[name], cfg.Mode, cfg.PinPath, func() error { return record(name) }); err != nil {
			return err
		}
		l.Log.Info().Str("iface", name).Int("ifindex", ifaces[name]).Str("mode", string(cfg.Mode)).Msg("attached XDP program")
		res.Attached = append(res.Attached, name)
	}
	// The configured set is exactly -i: a load with fewer interfaces stops
	// watching the others.
	have, err := records.List()
	if err != nil {
		return err
	}
	for _, r := range have {
		if _, ok := ifaces[r.Name]; ok {
			continue
		}
		if err := records.Delete(r.Name); err != nil {
			return err
		}
		res.Unconfigured = append(res.Unconfigured, r.Name)
		l.Log.Info().Str("iface", r.Name).Msg("interface no longer configured")
	}

	if fresh {
		if err := os.Rename(nextPath, progPath); err != nil {
			return fmt.Errorf("replace program pin %s: %w", progPath, err)
		}
	}
	return nil
}

var errStaleLink = errors.New("stale link")

// convergeLink checks one pinned link: still attached to the interface of
// that name, in the mode asked, running prog. It moves the link to prog
// in place when it runs anything else.
func (l *Loader) convergeLink(lk link.Link, path, name string, ifaces map[string]int, cfg *Config,
	prog *ebpf.Program, progID ebpf.ProgramID, res *Result) error {
	info, err := lk.Info()
	if err != nil {
		return fmt.Errorf("inspect link %s: %w", path, err)
	}
	xdp := info.XDP()
	ifindex := 0
	if xdp != nil {
		ifindex = int(xdp.Ifindex)
	}
	want, requested := ifaces[name]
	if ifindex == 0 || (requested && ifindex != want) {
		// The interface went away (the kernel detached the link) or was
		// replaced by another of the same name.
		l.Log.Warn().Str("iface", name).Msg("pinned link no longer attached to the interface; replacing it")
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove stale link %s: %w", path, err)
		}
		if requested {
			res.Reattached = append(res.Reattached, name)
		}
		return errStaleLink
	}

	if requested && cfg.Mode != ModeAuto {
		mode, err := l.AttachedMode(ifindex)
		if err != nil {
			return err
		}
		if mode != cfg.Mode {
			return fmt.Errorf("%w: %s runs XDP in %s mode, --mode asks for %s: run \"aegis-loader unload -i %s\" and load again (the interface passes unfiltered in between), or keep --mode %s",
				ErrModeChange, name, mode, cfg.Mode, name, mode)
		}
	}

	if info.Program == progID {
		l.Log.Debug().Str("iface", name).Uint32("program", uint32(progID)).Msg("program up to date")
		return nil
	}
	if err := l.Update(lk, prog); err != nil {
		return fmt.Errorf("upgrade program on %s: %w", name, err)
	}
	res.Upgraded = append(res.Upgraded, name)
	l.Log.Info().Str("iface", name).Uint32("old_program", uint32(info.Program)).
		Uint32("new_program", uint32(progID)).Msg("upgraded program in place")
	return nil
}

// attach attaches prog to the interface through a new bpf_link and pins it
// at the interface's link pin, replacing whatever is pinned there in one
// rename: the link is pinned under a temporary name first. record runs
// between the two, so that the configured-interfaces record (which the
// daemons judge by) describes the new link before the pin points at it.
func (l *Loader) attach(prog *ebpf.Program, name string, ifindex int, mode Mode, pinPath string, record func() error) error {
	lk, err := l.Attach(link.XDPOptions{Program: prog, Interface: ifindex, Flags: modeFlags(mode)})
	if err != nil {
		switch {
		case errors.Is(err, ebpf.ErrNotSupported):
			return fmt.Errorf("%w: cannot attach to %s: XDP links need Linux 5.9 or later", ErrNoXDPLink, name)
		case errors.Is(err, unix.EBUSY), errors.Is(err, unix.EEXIST):
			return fmt.Errorf("%w: %s: %s", ErrXDPBusy, name, foreignXDPHint(name, ifindex))
		case mode == ModeNative && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)):
			return fmt.Errorf("%w: %s has no native XDP: use --mode generic (or auto)", ErrModeUnsupported, name)
		}
		return fmt.Errorf("attach XDP to %s: %w", name, err)
	}
	defer lk.Close() // the pin keeps it attached; without one this detaches
	tmp, path := state.LinkTempPath(pinPath, name), state.LinkPath(pinPath, name)
	_ = os.Remove(tmp)
	if err := lk.Pin(tmp); err != nil {
		return fmt.Errorf("pin link %s: %w", tmp, err)
	}
	if err := record(); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin link %s: %w", path, err)
	}
	return nil
}
