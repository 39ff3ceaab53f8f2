package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// ConfigSection is the data section of config_data, the variable the
// programs read the config through (see aegis.c).
const ConfigSection = ".data.config"

// DirectConfig prepares spec for loading: it points its programs'
// references to ConfigSection at the config map and drops the section's
// own map. The programs then read the config map itself, which user space
// writes and the loader pins, with direct value access: one load from a
// fixed address instead of a lookup. Loading the spec without it would
// give the programs a zeroed config of their own that nothing writes.
//
// A spec without the section (a build from before it) is left as it is,
// and applying DirectConfig twice changes nothing more. It fails if the
// section is not the config map's shape, which would be a broken build.
func DirectConfig(spec *ebpf.CollectionSpec) error {
	sec, ok := spec.Maps[ConfigSection]
	if !ok {
		return nil
	}
	cfg, ok := spec.Maps[AegisMapConfig]
	if !ok {
		return fmt.Errorf("object has %s but no %s map", ConfigSection, AegisMapConfig)
	}
	if sec.ValueSize != cfg.ValueSize || cfg.Type != ebpf.Array || cfg.MaxEntries != 1 {
		return fmt.Errorf("%s (%d bytes) does not fit the %s map (%v of %d, %d bytes)",
			ConfigSection, sec.ValueSize, AegisMapConfig, cfg.Type, cfg.MaxEntries, cfg.ValueSize)
	}
	for _, p := range spec.Programs {
		for i := range p.Instructions {
			if p.Instructions[i].Reference() == ConfigSection {
				p.Instructions[i] = p.Instructions[i].WithReference(AegisMapConfig)
			}
		}
	}
	delete(spec.Maps, ConfigSection)
	return nil
}

// Spec returns the data path as it is loaded: LoadAegis, then
// DirectConfig.
func Spec() (*ebpf.CollectionSpec, error) {
	spec, err := LoadAegis()
	if err != nil {
		return nil, err
	}
	if err := DirectConfig(spec); err != nil {
		return nil, err
	}
	return spec, nil
}

// LoadObjects is LoadAegisObjects on Spec: the programs and maps of the
// data path, with the programs reading the config map.
func LoadObjects(objs *AegisObjects, opts *ebpf.CollectionOptions) error {
	spec, err := Spec()
	if err != nil {
		return err
	}
	return spec.LoadAndAssign(objs, opts)
}
