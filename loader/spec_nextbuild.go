//go:build aegis_nextbuild

package loader

import (
	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf/nextbuild"
)

// embeddedSpec is the data path this binary installs: here the "next
// release" used by upgrade tests (see bpf/nextbuild).
func embeddedSpec() (*ebpf.CollectionSpec, error) { return nextbuild.LoadAegis() }
