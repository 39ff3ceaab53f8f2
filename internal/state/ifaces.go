package state

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// The configured interfaces: the set aegis-loader load was given with -i,
// recorded in the pinned map MapIfaces so that every process can check
// that each of them is filtered, and aegis-loader watch can restore it,
// without being told the loader's flags. The loader and the watcher write
// it under the pin directory's exclusive lock; everyone else reads it.

// MapIfaces is the pinned map of configured interfaces.
const MapIfaces = "ifaces"

// AttachMode is how XDP is attached to an interface: auto lets the kernel
// use the driver's native XDP when it has one and generic (skb) XDP
// otherwise.
type AttachMode string

// Attach modes.
const (
	ModeAuto    AttachMode = "auto"
	ModeNative  AttachMode = "native"
	ModeGeneric AttachMode = "generic"
)

var modeCodes = map[AttachMode]bpf.AegisAttachMode{
	ModeAuto:    bpf.AegisAttachModeATTACH_MODE_AUTO,
	ModeNative:  bpf.AegisAttachModeATTACH_MODE_NATIVE,
	ModeGeneric: bpf.AegisAttachModeATTACH_MODE_GENERIC,
}

// Interface is the record of one configured interface.
type Interface struct {
	Name string `json:"name"`
	// Ifindex is the device the pinned link was attached to; 0 before the
	// first attach.
	Ifindex int `json:"ifindex"`
	// ProgramID is the program that link runs, kept current across
	// upgrades, so that a process that may not open the link can still
	// tell our program from another.
	ProgramID ebpf.ProgramID `json:"program_id"`
	Mode      AttachMode     `json:"mode"`
	// OperatorDetached is set by "aegis-loader unload -i": the interface
	// stays configured (and reported unfiltered) but nothing re-attaches
	// it until the next load.
	OperatorDetached bool `json:"operator_detached"`
}

// InterfaceKey returns the map key of an interface name. Returns an error
// wrapping ErrInvalid for a name the kernel would not take.
func InterfaceKey(name string) (bpf.AegisIfaceKey, error) {
	var k bpf.AegisIfaceKey
	if name == "" || len(name) >= len(k.Name) {
		return k, fmt.Errorf("%w: interface name %q: 1-%d bytes", ErrInvalid, name, len(k.Name)-1)
	}
	for i := range len(name) {
		k.Name[i] = int8(name[i])
	}
	return k, nil
}

func keyName(k bpf.AegisIfaceKey) string {
	b := make([]byte, 0, len(k.Name))
	for _, c := range k.Name {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

func (i Interface) value() (bpf.AegisIfaceValue, error) {
	code, ok := modeCodes[i.Mode]
	if !ok {
		return bpf.AegisIfaceValue{}, fmt.Errorf("%w: attach mode %q", ErrInvalid, i.Mode)
	}
	v := bpf.AegisIfaceValue{Ifindex: uint32(i.Ifindex), ProgId: uint32(i.ProgramID), Mode: code}
	if i.OperatorDetached {
		v.OperatorDetached = 1
	}
	return v, nil
}

func interfaceFrom(k bpf.AegisIfaceKey, v bpf.AegisIfaceValue) Interface {
	i := Interface{Name: keyName(k), Ifindex: int(v.Ifindex), ProgramID: ebpf.ProgramID(v.ProgId),
		Mode: ModeAuto, OperatorDetached: v.OperatorDetached != 0}
	for m, c := range modeCodes {
		if c == v.Mode {
			i.Mode = m
		}
	}
	return i
}

// Interfaces is an open handle on the configured-interfaces map.
type Interfaces struct{ m *ebpf.Map }

// OpenInterfaces opens the pinned map of configured interfaces, for
// writing when writable (the loader and the watcher, under the pin
// directory's exclusive lock). Returns ErrNotLoaded if it is not pinned
// (the loader has not run, or an older loader made the pins: the next
// load creates it) and ErrPermission if it may not be opened.
func OpenInterfaces(pinPath string, writable bool) (*Interfaces, error) {
	path := MapPath(pinPath, MapIfaces)
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: !writable})
	if err != nil {
		return nil, openError(path, err)
	}
	spec, err := Spec()
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("load embedded data path: %w", err)
	}
	if err := CheckLayout(spec.Maps[MapIfaces], m); err != nil {
		m.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &Interfaces{m: m}, nil
}

// NewInterfaces wraps an open map of configured interfaces (the loader's,
// which it created itself). The caller keeps ownership of m.
func NewInterfaces(m *ebpf.Map) *Interfaces { return &Interfaces{m: m} }

// Close releases the map.
func (s *Interfaces) Close() error { return s.m.Close() }

// List returns every record, sorted by name.
func (s *Interfaces) List() ([]Interface, error) {
	var (
		out []Interface
		k   bpf.AegisIfaceKey
		v   bpf.AegisIfaceValue
	)
	it := s.m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, interfaceFrom(k, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", MapIfaces, err)
	}
	slices.SortFunc(out, func(a, b Interface) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return out, nil
}

// Get returns the record of one interface; ok is false if it is not
// configured.
func (s *Interfaces) Get(name string) (_ Interface, ok bool, _ error) {
	k, err := InterfaceKey(name)
	if err != nil {
		return Interface{}, false, err
	}
	var v bpf.AegisIfaceValue
	err = s.m.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Interface{}, false, nil
	}
	if err != nil {
		return Interface{}, false, fmt.Errorf("read %s %s: %w", MapIfaces, name, err)
	}
	return interfaceFrom(k, v), true, nil
}

// Put writes one record.
func (s *Interfaces) Put(i Interface) error {
	k, err := InterfaceKey(i.Name)
	if err != nil {
		return err
	}
	v, err := i.value()
	if err != nil {
		return err
	}
	if err := s.m.Put(&k, &v); err != nil {
		return fmt.Errorf("write %s %s: %w", MapIfaces, i.Name, err)
	}
	return nil
}

// Delete removes one record; removing an absent one is not an error.
func (s *Interfaces) Delete(name string) error {
	k, err := InterfaceKey(name)
	if err != nil {
		return err
	}
	if err := s.m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete %s %s: %w", MapIfaces, name, err)
	}
	return nil
}

// ReadInterfaces lists the configured interfaces pinned under pinPath.
// Returns ErrNotLoaded when there is no record of them.
func ReadInterfaces(pinPath string) ([]Interface, error) {
	s, err := OpenInterfaces(pinPath, false)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.List()
}
