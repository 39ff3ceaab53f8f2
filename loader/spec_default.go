//go:build !aegis_nextbuild

package loader

import (
	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// embeddedSpec is the data path this binary installs.
func embeddedSpec() (*ebpf.CollectionSpec, error) { return bpf.Spec() }
