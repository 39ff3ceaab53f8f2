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
// the set: it writes the flows the XDP program of the same set reads. The
// spec is prepared with bpf.DirectConfig first, if it was not.
func LoadEgressProgram(spec *ebpf.CollectionSpec, maps *Maps) (*ebpf.Program, error) {
	if err := bpf.DirectConfig(spec); err != nil {
		return nil, err
	}
	var objs struct {
		P *ebpf.Program `ebpf:"aegis_egress"`
	}
	err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps.ByName()})
	return objs.P, err
}

// LoadProgram loads a build's XDP program against the maps of the set, so
// that it shares them with the running data path instead of creating its
// own. The spec is prepared with bpf.DirectConfig first, if it was not.
func LoadProgram(spec *ebpf.CollectionSpec, maps *Maps) (*ebpf.Program, error) {
	if err := bpf.DirectConfig(spec); err != nil {
		return nil, err
	}
	var objs struct {
		P *ebpf.Program `ebpf:"aegis_xdp"`
	}
	err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps.ByName()})
	return objs.P, err
}

// LocalityProgramSpec returns the locality program of a data path build:
// the XDP program's own delivered_locally(), for user space to ask.
func LocalityProgramSpec(spec *ebpf.CollectionSpec) (*ebpf.ProgramSpec, error) {
	var ps bpf.AegisProgramSpecs
	if err := spec.Assign(&ps); err != nil {
		return nil, fmt.Errorf("find locality program: %w", err)
	}
	return ps.AegisLocality, nil
}

// LoadLocalityProgram loads a build's locality program. It uses no map.
func LoadLocalityProgram(spec *ebpf.CollectionSpec) (*ebpf.Program, error) {
	var objs struct {
		P *ebpf.Program `ebpf:"aegis_locality"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load locality program: %w", err)
	}
	return objs.P, nil
}
