package explain

import (
	"errors"
	"fmt"
	"net/netip"

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

// xdpMD is struct xdp_md as BPF_PROG_TEST_RUN takes it: data_end the
// frame's length, ingress_ifindex an interface of the caller's namespace.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

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
	ret, err := p.prog.Run(&ebpf.RunOptions{Data: pkt, Context: xdpMD{DataEnd: uint32(len(pkt)), IngressIfindex: p.ifindex}})
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
