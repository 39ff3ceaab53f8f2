package explain

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Where the bypasses' "local destination" comes from.
//
// The controller's gRPC bypass (and neighbour discovery to a unicast
// address) passes only when bpf_fib_lookup, an input lookup from the
// ingress interface with no source, answers NOT_FWDED. No netlink query
// asks the kernel that: RTM_GETROUTE with an input interface runs the
// whole input path (a source is required and validated, reverse-path
// filtering applies), and without one it is an output lookup, which
// ignores the ingress interface's forwarding switch (FWD_DISABLED makes
// nothing local), its policy rules and its VRF table. So explain runs the
// data path's own delivered_locally(), compiled into the locality program
// that the loader pins beside the XDP program, with BPF_PROG_TEST_RUN on a
// frame to the destination arriving on the interface. The program uses no
// map: running it changes nothing, as explain promises.
//
// Without the pin (a loader of an older release) explain falls back on
// RoutedLocally and says so.

// Probe answers Local with the locality program.
type Probe struct {
	prog    *ebpf.Program
	ifindex uint32
	// Err is the first failure to run the program; Local answers false
	// from then on.
	Err error
}

// ErrNoProbe is returned by OpenProbe when the loader pinned no locality
// program.
var ErrNoProbe = errors.New("no locality program pinned")

// OpenProbe opens the pinned locality program, to ask about packets that
// arrive on the interface ifindex. The caller must run Local in the
// network namespace of that interface.
func OpenProbe(pinPath string, ifindex uint32) (*Probe, error) {
	prog, err := ebpf.LoadPinnedProgram(state.LocalityProgramPath(pinPath), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoProbe, err)
	}
	return NewProbe(prog, ifindex), nil
}

// NewProbe asks prog, a loaded locality program, about packets arriving on
// ifindex. The probe owns prog.
func NewProbe(prog *ebpf.Program, ifindex uint32) *Probe {
	return &Probe{prog: prog, ifindex: ifindex}
}

// Close releases the program.
func (p *Probe) Close() error { return p.prog.Close() }

// Local reports whether the data path treats dst as local for a packet
// arriving on the probe's interface.
func (p *Probe) Local(dst netip.Addr) bool {
	if p.Err != nil {
		return false
	}
	src := netip.IPv4Unspecified()
	if dst.Is6() {
		src = netip.IPv6Unspecified()
	}
	pkt, err := Flow{Src: src, Dst: dst, Port: 1}.Frame()
	if err != nil {
		p.Err = err
		return false
	}
	ret, err := p.prog.Run(&ebpf.RunOptions{Data: pkt, Context: bpf.XDPArrival(pkt, p.ifindex)})
	switch {
	case err != nil:
		p.Err = fmt.Errorf("run locality program: %w", err)
	case bpf.Action(ret) == bpf.XDPPass:
		return true
	case bpf.Action(ret) != bpf.XDPDrop:
		p.Err = fmt.Errorf("locality program returned %d for %s", ret, dst)
	}
	return false
}

// Locality answers Local for explaining a packet that arrives on one of
// the configured interfaces: the first, by name, that the loader attached.
// It asks the pinned locality program when there is one, and the routing
// table over netlink otherwise (Note then says so).
type Locality struct {
	// Interface is the interface the answers are for; empty when none is
	// attached.
	Interface string
	probe     *Probe
	asked     bool
}

// ForPins returns the Locality of the data path pinned at pinPath. Run
// Local in the gateway's network namespace.
func ForPins(pinPath string) *Locality {
	l := &Locality{}
	ifaces, err := state.ReadInterfaces(pinPath)
	if err != nil {
		return l
	}
	slices.SortFunc(ifaces, func(a, b state.Interface) int { return strings.Compare(a.Name, b.Name) })
	for _, i := range ifaces {
		if i.Ifindex == 0 {
			continue
		}
		if ifc, err := net.InterfaceByIndex(i.Ifindex); err != nil || ifc.Name != i.Name {
			continue
		}
		l.Interface = i.Name
		if p, err := OpenProbe(pinPath, uint32(i.Ifindex)); err == nil {
			l.probe = p
		}
		break
	}
	return l
}

// Local answers whether dst is local to a packet arriving on Interface.
func (l *Locality) Local(dst netip.Addr) bool {
	l.asked = true
	if l.probe != nil {
		return l.probe.Local(dst)
	}
	return RoutedLocally(dst)
}

// Err is the probe's failure, if it failed.
func (l *Locality) Err() error {
	if l.probe != nil {
		return l.probe.Err
	}
	return nil
}

// Note says, when the answer came from the routing table instead of the
// data path's own lookup, that it may differ; empty otherwise.
func (l *Locality) Note() string {
	if !l.asked || l.probe != nil {
		return ""
	}
	return "whether the destination is local comes from the routing table, which may differ from the data path's lookup (no locality program pinned: run aegis-loader load of this release)"
}

// Close releases the probe.
func (l *Locality) Close() {
	if l.probe != nil {
		l.probe.Close()
	}
}
