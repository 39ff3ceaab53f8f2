package loader

import (
	"fmt"
	"os"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/internal/state"
)

// pinLocality pins this build's locality program (internal/state's
// locality.go), unless the pin already holds it. It is never attached; the
// daemons run it with BPF_PROG_TEST_RUN to learn the data path's answer to
// "is this destination local" for explain. Opening a program pin takes
// read and write permission, so the pin is the group's 0660: the program
// uses no map, and what running it can do is answer the question.
//
// A failure here leaves explain without the exact answer (it falls back on
// a route query and says so) but the data path untouched, so it is logged,
// not fatal.
func (l *Loader) pinLocality(spec *ebpf.CollectionSpec, pd *pinDir, gid int) {
	if err := l.ensureLocality(spec, pd, gid); err != nil {
		l.Log.Warn().Err(err).Msg("locality program not pinned: explain falls back on the routing table")
	}
}

func (l *Loader) ensureLocality(spec *ebpf.CollectionSpec, pd *pinDir, gid int) error {
	path := state.LocalityProgramPath(pd.path)
	ps, err := state.LocalityProgramSpec(spec)
	if err != nil {
		return err
	}
	if p, err := ebpf.LoadPinnedProgram(path, nil); err == nil {
		info, err := p.Info()
		same := err == nil && ps.Compatible(info) == nil
		p.Close()
		if same {
			return setPinOwner(pd.fd(), path, gid, 0o660)
		}
	}
	prog, err := state.LoadLocalityProgram(spec)
	if err != nil {
		return err
	}
	defer prog.Close()
	tmp := state.LocalityProgramNextPath(pd.path)
	_ = os.Remove(tmp)
	if err := prog.Pin(tmp); err != nil {
		return fmt.Errorf("pin locality program %s: %w", tmp, err)
	}
	if err := setPinOwner(pd.fd(), tmp, gid, 0o660); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("replace locality program pin %s: %w", path, err)
	}
	l.Log.Info().Str("pin", path).Msg("pinned locality program")
	return nil
}
