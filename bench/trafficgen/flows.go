package trafficgen

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
)

// Addresses of the generated flows (see trafficgen.c): documentation
// ranges, sources outside the client's own subnet so that no source is an
// address of the gateway.
var (
	SrcV4Base = netip.MustParseAddr("203.0.113.0")
	SrcV6Base = netip.MustParseAddr("2001:db8:3::")
)

// FlowV4 is flow i of the IPv4 mapping gen_xdp applies: it must stay the
// program's, or the sessions filled for a flood would not be its flows.
func FlowV4(i uint32) (src, dst netip.Addr, dport uint16) {
	src = netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
	dst = netip.AddrFrom4([4]byte{198, 51, 100, byte(2 + (i>>8)%250)})
	return src, dst, uint16(1024 + (i>>8)/250)
}

// FlowV6Src is the source of IPv6 flow i; destination and port are the
// template's.
func FlowV6Src(i uint32) netip.Addr {
	b := SrcV6Base.As16()
	binary.BigEndian.PutUint32(b[12:], i)
	return netip.AddrFrom16(b)
}

// MaxFlowsV4 is how many distinct IPv4 flows the mapping has before the
// destination port leaves 1024-65535.
const MaxFlowsV4 = 256 * 250 * (65536 - 1024)

// Options shape a loaded generator.
type Options struct {
	// Flows is the number of distinct flows, at least 1.
	Flows uint32
	// Eth is an Ethernet header whose addresses every frame gets back.
	Eth [14]byte
	// KeepDst leaves the IPv4 destination and port of the template
	// alone, for floods at one address of the gateway itself.
	KeepDst bool
}

// Load loads the generator and the drop program.
func Load(opts Options) (*TrafficgenObjects, error) {
	if opts.Flows == 0 || opts.Flows > MaxFlowsV4 {
		return nil, fmt.Errorf("load generator: %d flows: want 1-%d", opts.Flows, MaxFlowsV4)
	}
	spec, err := LoadTrafficgen()
	if err != nil {
		return nil, fmt.Errorf("load generator: %w", err)
	}
	if err := spec.Variables[TrafficgenVarNflows].Set(opts.Flows); err != nil {
		return nil, fmt.Errorf("load generator: %w", err)
	}
	keep := uint8(0)
	if opts.KeepDst {
		keep = 1
	}
	if err := spec.Variables[TrafficgenVarKeepDst].Set(keep); err != nil {
		return nil, fmt.Errorf("load generator: %w", err)
	}
	if err := spec.Variables[TrafficgenVarEthHdr].Set(opts.Eth); err != nil {
		return nil, fmt.Errorf("load generator: %w", err)
	}
	var objs TrafficgenObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load generator: %w", err)
	}
	return &objs, nil
}

// UDPv4 is a minimum Ethernet frame (60 bytes, 64 on the wire with the
// FCS) carrying UDP from src to dst:dport, with a valid IPv4 header
// checksum and no UDP checksum.
func UDPv4(srcMAC, dstMAC net.HardwareAddr, src, dst netip.Addr, dport uint16) []byte {
	b := make([]byte, 60)
	copy(b[0:], dstMAC)
	copy(b[6:], srcMAC)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 46) // to the end of the minimum frame
	ip[8] = 64
	ip[9] = 17
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum(0, ip)))
	udp := b[34:]
	binary.BigEndian.PutUint16(udp[0:], 4000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], 26)
	return b
}

// UDPv6 is the smallest IPv6 UDP frame: 62 bytes (66 on the wire), no
// payload, with a valid UDP checksum.
func UDPv6(srcMAC, dstMAC net.HardwareAddr, src, dst netip.Addr, dport uint16) []byte {
	b := make([]byte, 62)
	copy(b[0:], dstMAC)
	copy(b[6:], srcMAC)
	binary.BigEndian.PutUint16(b[12:], 0x86dd)
	ip := b[14:54]
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], 8)
	ip[6] = 17
	ip[7] = 64
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	udp := b[54:]
	binary.BigEndian.PutUint16(udp[0:], 4000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], 8)
	c := sum(0, ip[8:40]) + 17 + 8
	c = sum(c, udp)
	binary.BigEndian.PutUint16(udp[6:], ^fold(c))
	return b
}

func sum(s uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// Run transmits frame repeat times out of ifindex, which must be in the
// calling thread's network namespace.
func Run(prog *ebpf.Program, frame []byte, ifindex int, repeat uint32) error {
	_, err := prog.Run(&ebpf.RunOptions{
		Data:   frame,
		Repeat: repeat,
		Flags:  bpfFTestXDPLiveFrames,
		// Live frames leave through (and XDP_TX returns them to) the
		// ingress device.
		Context: bpf.XDPArrival(frame, uint32(ifindex)),
	})
	if err != nil {
		return fmt.Errorf("run generator: %w", err)
	}
	return nil
}

// BPF_F_TEST_XDP_LIVE_FRAMES, as in the kernel's UAPI.
const bpfFTestXDPLiveFrames = unix.BPF_F_TEST_XDP_LIVE_FRAMES
