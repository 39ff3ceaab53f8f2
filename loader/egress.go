package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/internal/state"
)

// The reply path: aegis_egress on each filtered interface's tcx egress
// hook records the flows the gateway opens, so that aegis_xdp passes their
// replies. Its link is pinned beside the XDP link (state.EgressLinkPath)
// and converged the same way: attached where missing, moved to this build
// with link.Update where another build runs, replaced where the interface
// it was attached to is gone.
//
// The egress program is loaded from the same collection spec as the XDP
// program, against the same pinned maps (state.LoadEgressProgram), so both
// read and write the one flows_v4/flows_v6. It is loaded only when a link
// needs it; the link holds it, so it has no pin of its own.
//
// tcx needs Linux 6.6. On an older kernel a load with reply tracking fails
// with ErrNoTCX, naming --no-reply-tracking as the way to run without it:
// attaching only the XDP half would silently drop every reply the gateway
// expects, which an operator should choose, not discover.

// egressProgram loads this build's egress program at most once per load.
type egressProgram struct {
	spec *ebpf.CollectionSpec
	maps *state.Maps
	prog *ebpf.Program
	id   ebpf.ProgramID
}

func (e *egressProgram) get() (*ebpf.Program, ebpf.ProgramID, error) {
	if e.prog != nil {
		return e.prog, e.id, nil
	}
	prog, err := state.LoadEgressProgram(e.spec, e.maps)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, 0, fmt.Errorf("the kernel's verifier rejected the egress program: %v", ve)
		}
		return nil, 0, fmt.Errorf("load egress program: %w", err)
	}
	id, err := programID(prog)
	if err != nil {
		prog.Close()
		return nil, 0, err
	}
	e.prog, e.id = prog, id
	return prog, id, nil
}

func (e *egressProgram) Close() {
	if e.prog != nil {
		e.prog.Close()
	}
}

// sameEgressBuild reports whether the program with this id is spec's
// egress program, by the kernel's tag of its instructions. It looks at the
// pinned egress program when that is the one with this id: opening a
// program by id needs CAP_SYS_ADMIN, which the loader's unit does not
// grant. Any doubt answers false, which costs an in-place update.
func sameEgressBuild(spec *ebpf.CollectionSpec, id ebpf.ProgramID, pinPath string) bool {
	ps, err := state.EgressProgramSpec(spec)
	if err != nil {
		return false
	}
	p, err := ebpf.LoadPinnedProgram(state.EgressProgramPath(pinPath), nil)
	if err != nil {
		if p, err = ebpf.NewProgramFromID(id); err != nil {
			return false
		}
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return false
	}
	if pid, ok := info.ID(); !ok || pid != id {
		return false
	}
	return ps.Compatible(info) == nil
}

// linkedEgressProgram opens the egress program with this id: the pinned
// one when it is that program (the watcher has no CAP_SYS_ADMIN, which
// opening a program by id needs), else by id.
func linkedEgressProgram(pinPath string, id ebpf.ProgramID) (*ebpf.Program, error) {
	if p, err := ebpf.LoadPinnedProgram(state.EgressProgramPath(pinPath), nil); err == nil {
		if info, err := p.Info(); err == nil {
			if pid, ok := info.ID(); ok && pid == id {
				return p, nil
			}
		}
		p.Close()
	}
	return ebpf.NewProgramFromID(id)
}

// pinEgressProgram pins prog as the egress program, replacing the pin in
// one rename.
func pinEgressProgram(prog *ebpf.Program, pinPath string) error {
	next, path := state.EgressProgramNextPath(pinPath), state.EgressProgramPath(pinPath)
	_ = os.Remove(next)
	if err := prog.Pin(next); err != nil {
		return fmt.Errorf("pin egress program %s: %w", next, err)
	}
	if err := os.Chmod(next, 0o600); err != nil {
		_ = os.Remove(next)
		return fmt.Errorf("chmod %s: %w", next, err)
	}
	if err := os.Rename(next, path); err != nil {
		_ = os.Remove(next)
		return fmt.Errorf("replace egress program pin %s: %w", path, err)
	}
	return nil
}

// convergeEgress brings the egress links to cfg: with reply tracking, one
// link running this build on every interface in ifaces; without it, none.
// Egress links of interfaces not in ifaces are upgraded and left, as their
// XDP links are.
func (l *Loader) convergeEgress(spec *ebpf.CollectionSpec, maps *state.Maps, cfg *Config, ifaces map[string]int, res *Result) error {
	linked, err := state.EgressLinkedInterfaces(cfg.PinPath)
	if err != nil {
		return err
	}
	if cfg.NoReplyTracking {
		for _, name := range linked {
			ok, err := detachPinned(state.EgressLinkPath(cfg.PinPath, name))
			if err != nil {
				return fmt.Errorf("detach egress program from %s: %w", name, err)
			}
			if ok {
				res.EgressDetached = append(res.EgressDetached, name)
				l.Log.Info().Str("iface", name).Msg("detached egress program: reply tracking is off")
			}
		}
		return nil
	}
	ep := &egressProgram{spec: spec, maps: maps}
	defer ep.Close()
	names := slices.Clone(linked)
	for name := range ifaces {
		if !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		ifindex, requested := ifaces[name]
		if err := l.ensureEgress(ep, cfg.PinPath, name, ifindex, requested, res); err != nil {
			return err
		}
	}
	if ep.prog != nil {
		// Links now run this build's program: pin it, so that the next
		// load recognizes it.
		return pinEgressProgram(ep.prog, cfg.PinPath)
	}
	return nil
}

// reattachEgress attaches the named interface's egress link again where
// its pin holds a link the kernel detached (the device was unregistered)
// or one attached to another device of that name: what the watcher calls
// after it re-attached the XDP link of a re-created interface. The new
// link runs the program the old one ran, which its pin still holds, so
// no verifier runs; it is pinned under a temporary name and renamed over
// the old pin. An interface without an egress pin (reply tracking off, or
// never loaded) is left alone. Returns whether it attached. The caller
// holds the pin directory's lock.
func (l *Loader) reattachEgress(pinPath, name string, ifindex int) (bool, error) {
	path := state.EgressLinkPath(pinPath, name)
	old, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer old.Close()
	info, err := old.Info()
	if err != nil {
		return false, fmt.Errorf("inspect link %s: %w", path, err)
	}
	if t := info.TCX(); t != nil && t.Ifindex != 0 && int(t.Ifindex) == ifindex {
		return false, nil
	}
	prog, err := linkedEgressProgram(pinPath, info.Program)
	if err != nil {
		return false, fmt.Errorf("open egress program %d of %s: %w", info.Program, path, err)
	}
	defer prog.Close()
	nl, err := l.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		return false, fmt.Errorf("attach egress program to %s: %w", name, err)
	}
	defer nl.Close() // the pin keeps it attached; without one this detaches
	tmp := path + state.TempLinkSuffix
	_ = os.Remove(tmp)
	if err := nl.Pin(tmp); err != nil {
		return false, fmt.Errorf("pin link %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("pin link %s: %w", path, err)
	}
	l.Log.Info().Str("iface", name).Int("ifindex", ifindex).Msg("re-attached egress program")
	return true, nil
}

// ensureEgress converges one interface's egress link. ifindex is the
// interface's index now; requested says whether it should be attached if
// it is not.
func (l *Loader) ensureEgress(ep *egressProgram, pinPath, name string, ifindex int, requested bool, res *Result) error {
	path := state.EgressLinkPath(pinPath, name)
	lk, err := link.LoadPinnedLink(path, nil)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("open pinned link %s: %w", path, err)
	default:
		defer lk.Close()
		info, err := lk.Info()
		if err != nil {
			return fmt.Errorf("inspect link %s: %w", path, err)
		}
		at := 0
		if t := info.TCX(); t != nil {
			at = int(t.Ifindex)
		}
		if at != 0 && (!requested || at == ifindex) {
			if sameEgressBuild(ep.spec, info.Program, pinPath) {
				return nil
			}
			prog, id, err := ep.get()
			if err != nil {
				return err
			}
			if err := l.Update(lk, prog); err != nil {
				return fmt.Errorf("upgrade egress program on %s: %w", name, err)
			}
			res.EgressUpgraded = append(res.EgressUpgraded, name)
			l.Log.Info().Str("iface", name).Uint32("old_program", uint32(info.Program)).
				Uint32("new_program", uint32(id)).Msg("upgraded egress program in place")
			return nil
		}
		// The interface went away (the kernel detached the link) or was
		// replaced by another of the same name.
		l.Log.Warn().Str("iface", name).Msg("pinned egress link no longer attached to the interface; replacing it")
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove stale link %s: %w", path, err)
		}
		if !requested {
			return nil
		}
	}
	if !requested {
		return nil
	}
	prog, _, err := ep.get()
	if err != nil {
		return err
	}
	nl, err := l.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		// link.AttachTCX probes the kernel when the attach fails and then
		// returns ErrNotSupported if tcx does not exist.
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: cannot attach the reply path's egress program to %s: tcx needs Linux 6.6 or later; load with --no-reply-tracking to filter without it (replies to connections the gateway opens then drop)",
				ErrNoTCX, name)
		}
		return fmt.Errorf("attach egress program to %s: %w", name, err)
	}
	if err := nl.Pin(path); err != nil {
		nl.Close() // detaches
		return fmt.Errorf("pin link %s: %w", path, err)
	}
	nl.Close() // the pin keeps it attached
	res.EgressAttached = append(res.EgressAttached, name)
	l.Log.Info().Str("iface", name).Int("ifindex", ifindex).Msg("attached egress program")
	return nil
}

// detachEgress detaches the named interface's egress link, if any.
func (l *Loader) detachEgress(pinPath, name string) error {
	ok, err := detachPinned(state.EgressLinkPath(pinPath, name))
	if err != nil {
		return fmt.Errorf("detach egress program from %s: %w", name, err)
	}
	if ok {
		l.Log.Info().Str("iface", name).Msg("detached egress program")
	}
	return nil
}

// detachAllEgress detaches every pinned egress link, including those whose
// interface has no XDP link any more.
func (l *Loader) detachAllEgress(pinPath string) error {
	names, err := state.EgressLinkedInterfaces(pinPath)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := l.detachEgress(pinPath, name); err != nil {
			return err
		}
	}
	return nil
}

// EgressStatus describes one pinned egress link.
type EgressStatus struct {
	Attached  bool   `json:"attached"`
	Ifindex   int    `json:"ifindex"`
	LinkID    uint32 `json:"link_id"`
	ProgramID uint32 `json:"program_id"`
	// Current reports whether the link runs this binary's build.
	Current bool `json:"current"`
}

// addEgressStatus adds each pinned egress link to the interface of its
// name, and lists an interface that has only an egress link on its own.
func addEgressStatus(st *Status, spec *ebpf.CollectionSpec, pinPath string) error {
	names, err := state.EgressLinkedInterfaces(pinPath)
	if err != nil {
		return err
	}
	for _, name := range names {
		path := state.EgressLinkPath(pinPath, name)
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", path, err)
		}
		info, err := lk.Info()
		lk.Close()
		if err != nil {
			return fmt.Errorf("inspect link %s: %w", path, err)
		}
		es := &EgressStatus{LinkID: uint32(info.ID), ProgramID: uint32(info.Program)}
		if t := info.TCX(); t != nil && t.Ifindex != 0 {
			es.Attached, es.Ifindex = true, int(t.Ifindex)
			es.Current = sameEgressBuild(spec, info.Program, pinPath)
		}
		i := slices.IndexFunc(st.Interfaces, func(is InterfaceStatus) bool {
			n, _, _ := strings.Cut(is.Name, " ")
			return n == name
		})
		if i < 0 {
			st.Interfaces = append(st.Interfaces, InterfaceStatus{Name: name})
			i = len(st.Interfaces) - 1
		}
		st.Interfaces[i].Egress = es
	}
	return nil
}
