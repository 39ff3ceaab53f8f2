package state

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// ProgramSpec returns the XDP program of a data path build. The program's
// name comes from the object (the generated bpf.AegisProgramSpecs), so
// every build with the same entry point is found the same way.
func ProgramSpec(spec *ebpf.CollectionSpec) (*ebpf.ProgramSpec, error) {
	var ps bpf.AegisProgramSpecs
	if err := spec.Assign(&ps); err != nil {
		return nil, fmt.Errorf("find XDP program: %w", err)
	}
	return ps.AegisXdp, nil
}

// EgressProgramSpec returns the tcx egress program of a data path build.
func EgressProgramSpec(spec *ebpf.CollectionSpec) (*ebpf.ProgramSpec, error) {
	var ps bpf.AegisProgramSpecs
	if err := spec.Assign(&ps); err != nil {
		return nil, fmt.Errorf("find egress program: %w", err)
	}
	return ps.AegisEgress, nil
}

// LoadEgressProgram loads a build's tcx egress program against the maps of
// the set: it writes the flows the XDP program of the same set reads.
func LoadEgressProgram(spec *ebpf.CollectionSpec, maps *Maps) (*ebpf.Program, error) {
	var objs bpf.AegisPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps.ByName()}); err != nil {
		return nil, err
	}
	objs.AegisXdp.Close()
	return objs.AegisEgress, nil
}

// LoadProgram loads a build's XDP program against the maps of the set, so
// that it shares them with the running data path instead of creating its
// own.
func LoadProgram(spec *ebpf.CollectionSpec, maps *Maps) (*ebpf.Program, error) {
	var objs bpf.AegisPrograms
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps.ByName()}); err != nil {
		return nil, err
	}
	objs.AegisEgress.Close()
	return objs.AegisXdp, nil
}
