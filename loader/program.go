package loader

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// currentProgram returns the pinned program if it is this build, or this
// build freshly loaded against the set's maps (fresh=true). With reload
// set it always loads afresh: the pinned program may be this build but
// runs on maps the set replaces.
func (l *Loader) currentProgram(spec *ebpf.CollectionSpec, maps *state.Maps, progPath string, reload bool) (_ *ebpf.Program, fresh bool, _ error) {
	pinned, err := ebpf.LoadPinnedProgram(progPath, nil)
	switch {
	case err == nil:
		if !reload && sameBuild(spec, pinned) {
			return pinned, false, nil
		}
		pinned.Close()
	case !errors.Is(err, fs.ErrNotExist):
		return nil, false, fmt.Errorf("open pinned program %s: %w", progPath, err)
	}
	prog, err := loadProgram(spec, maps)
	return prog, true, err
}

func programID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect program: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("inspect program: kernel reports no program id")
	}
	return id, nil
}

// sameBuild reports whether p is spec's XDP program: the kernel's tag of
// the instructions as loaded, not their ID or pin, tells builds apart.
func sameBuild(spec *ebpf.CollectionSpec, p *ebpf.Program) bool {
	ps, err := state.ProgramSpec(spec)
	if err != nil {
		return false
	}
	info, err := p.Info()
	return err == nil && ps.Compatible(info) == nil
}

// loadProgram loads the XDP program against the pinned maps.
func loadProgram(spec *ebpf.CollectionSpec, maps *state.Maps) (*ebpf.Program, error) {
	prog, err := state.LoadProgram(spec, maps)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
				return nil, fmt.Errorf("the kernel's verifier refused the XDP program for lack of privilege: aegis-loader needs CAP_BPF, CAP_PERFMON (variable-offset packet parsing) and CAP_NET_ADMIN: %v", ve)
			}
			return nil, fmt.Errorf("the kernel's verifier rejected the XDP program: %v", ve)
		}
		return nil, fmt.Errorf("load XDP program: %w", err)
	}
	return prog, nil
}
