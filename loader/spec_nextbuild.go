//go:build aegis_nextbuild

package loader

import (
	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/bpf/nextbuild"
)

// embeddedSpec is the data path this binary installs: here the "next
// release" used by upgrade tests (see bpf/nextbuild), prepared as
// bpf.Spec prepares this release's.
func embeddedSpec() (*ebpf.CollectionSpec, error) {
	spec, err := nextbuild.LoadAegis()
	if err != nil {
		return nil, err
	}
	if err := bpf.DirectConfig(spec); err != nil {
		return nil, err
	}
	return spec, nil
}
