package loader

// The loader's side of the fail-closed guard (internal/guard): every
// process that changes which interfaces are filtered (load, unload -i,
// each watcher repair and resync) rewrites the guard from the same
// evidence state.Judge uses, so the guard exempts exactly the devices the
// one definition of "filtered" calls filtered. Guard failures are logged,
// not fatal: a host without nf_tables still gets its XDP filter, and
// status says the guard is missing.

import (
	"errors"

	"github.com/aegis-agent/aegis/internal/guard"
	"github.com/aegis-agent/aegis/internal/state"
)

// guardState is what the guard must hold for the interfaces configured
// under pinPath: every name not operator-detached is guarded, and the
// ifindex of each filtered one (our program verifiably on it, as netlink
// reports) is exempt.
func guardState(pinPath string) (guard.State, error) {
	recs, err := state.ReadInterfaces(pinPath)
	if err != nil {
		return guard.State{}, err
	}
	var s guard.State
	for _, r := range recs {
		if r.OperatorDetached {
			continue
		}
		s.Configured = append(s.Configured, r.Name)
		o, err := state.Observe(pinPath, r)
		if err != nil {
			return guard.State{}, err
		}
		if state.Judge(o).Filtered {
			s.Filtered = append(s.Filtered, o.Device.Ifindex)
		}
	}
	return s, nil
}

// syncGuard rewrites the guard for the interfaces under pinPath. Callers
// hold the pin directory's lock, so two syncs never interleave their
// observations.
func (l *Loader) syncGuard(pinPath string) {
	if l.noGuard {
		return
	}
	s, err := guardState(pinPath)
	if err == nil {
		err = guard.Sync(s)
	}
	if errors.Is(err, state.ErrNotLoaded) {
		return
	}
	if err != nil {
		l.Log.Warn().Err(err).Msg("cannot update the guard of unfiltered interfaces")
		return
	}
	l.Log.Debug().Strs("guarded", s.Configured).Ints("filtered_ifindex", s.Filtered).Msg("guard updated")
}

// removeGuard removes the guard with the last pins.
func (l *Loader) removeGuard() {
	if l.noGuard {
		return
	}
	if err := guard.Remove(); err != nil {
		l.Log.Warn().Err(err).Msg("cannot remove the guard of unfiltered interfaces")
	}
}
