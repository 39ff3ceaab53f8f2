package testutil

import (
	"encoding/binary"
	"net/netip"
)

// Frame describes an Ethernet frame to build for BPF_PROG_TEST_RUN. It is
// written independently of the parser and the model so that the tests
// compare both with what the RFCs say, not with each other's assumptions.
type Frame struct {
	// VLANs are the tag protocol identifiers of the VLAN tags, outermost
	// first (0x8100 or 0x88A8).
	VLANs []uint16
	// EtherType overrides the type after the tags; zero derives it from
	// Src (IPv4 or IPv6).
	EtherType uint16

	Src, Dst netip.Addr
	Proto    uint8
	SrcPort  uint16
	DstPort  uint16

	// IPv4Options is the number of option bytes (a multiple of 4, ≤ 40).
	IPv4Options int
	// FragOffset is the fragment offset in 8-byte units; MoreFragments
	// sets the MF flag (IPv4) or the M bit of a fragment header (IPv6).
	FragOffset    uint16
	MoreFragments bool
	// IPv6Ext lists IPv6 extension header types (0, 43, 44, 51, 60) to
	// insert before the upper-layer header. A fragment (44) header carries
	// FragOffset and MoreFragments.
	IPv6Ext []uint8
	// ICMPType and ICMPCode are the ICMP/ICMPv6 type and code when Proto
	// is 1 or 58.
	ICMPType, ICMPCode uint8
	// HopLimit is the IPv4 TTL or IPv6 hop limit; zero means 64.
	HopLimit uint8
	// Payload is the number of payload bytes after the L4 header.
	Payload int
}

// Protocol numbers used in frames.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
	ProtoSCTP   = 132
)

// Bytes builds the frame with correct lengths.
func (f Frame) Bytes() []byte {
	b := make([]byte, 12, 128) // destination and source MAC: zero
	for _, tpid := range f.VLANs {
		b = binary.BigEndian.AppendUint16(b, tpid)
		b = binary.BigEndian.AppendUint16(b, 100) // TCI: VLAN 100
	}
	et := f.EtherType
	if et == 0 {
		et = 0x0800
		if f.Src.Is6() {
			et = 0x86DD
		}
	}
	b = binary.BigEndian.AppendUint16(b, et)
	switch et {
	case 0x0800:
		return f.appendIPv4(b)
	case 0x86DD:
		return f.appendIPv6(b)
	case 0x0806:
		return append(b, make([]byte, 28)...) // an all-zero ARP body
	default:
		return append(b, make([]byte, 46)...)
	}
}

func (f Frame) hopLimit() uint8 {
	if f.HopLimit == 0 {
		return 64
	}
	return f.HopLimit
}

func (f Frame) l4() []byte {
	var h []byte
	switch f.Proto {
	case ProtoTCP:
		h = make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], f.SrcPort)
		binary.BigEndian.PutUint16(h[2:], f.DstPort)
		h[12] = 5 << 4
		h[13] = 0x02 // SYN
	case ProtoUDP:
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[0:], f.SrcPort)
		binary.BigEndian.PutUint16(h[2:], f.DstPort)
		binary.BigEndian.PutUint16(h[4:], uint16(8+f.Payload))
	case ProtoICMP, ProtoICMPv6:
		h = make([]byte, 8)
		h[0], h[1] = f.ICMPType, f.ICMPCode
	default:
		h = make([]byte, 8)
	}
	return append(h, make([]byte, f.Payload)...)
}

func (f Frame) appendIPv4(b []byte) []byte {
	l4 := f.l4()
	ihl := 20 + f.IPv4Options
	h := make([]byte, ihl)
	h[0] = 4<<4 | byte(ihl/4)
	binary.BigEndian.PutUint16(h[2:], uint16(ihl+len(l4)))
	frag := f.FragOffset & 0x1FFF
	if f.MoreFragments {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(h[6:], frag)
	h[8] = f.hopLimit()
	h[9] = f.Proto
	if f.Src.Is4() && f.Dst.Is4() {
		src, dst := f.Src.As4(), f.Dst.As4()
		copy(h[12:], src[:])
		copy(h[16:], dst[:])
	}
	for i := 20; i < ihl; i++ {
		h[i] = 1 // NOP options
	}
	return append(append(b, h...), l4...)
}

func (f Frame) appendIPv6(b []byte) []byte {
	var ext []byte
	for i, t := range f.IPv6Ext {
		next := f.Proto
		if i+1 < len(f.IPv6Ext) {
			next = f.IPv6Ext[i+1]
		}
		switch t {
		case 44:
			h := make([]byte, 8)
			h[0] = next
			off := f.FragOffset << 3
			if f.MoreFragments {
				off |= 1
			}
			binary.BigEndian.PutUint16(h[2:], off)
			ext = append(ext, h...)
		case 51: // AH: length in 4-byte units minus 2; 16 bytes
			h := make([]byte, 16)
			h[0], h[1] = next, 2
			ext = append(ext, h...)
		default: // 8-byte units minus 1; 16 bytes with padding options
			h := make([]byte, 16)
			h[0], h[1] = next, 1
			h[2], h[3] = 1, 12 // PadN
			ext = append(ext, h...)
		}
	}
	l4 := f.l4()
	h := make([]byte, 40)
	h[0] = 6 << 4
	binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(l4)))
	h[6] = f.Proto
	if len(f.IPv6Ext) > 0 {
		h[6] = f.IPv6Ext[0]
	}
	h[7] = f.hopLimit()
	if f.Src.IsValid() && f.Dst.IsValid() {
		src, dst := f.Src.As16(), f.Dst.As16()
		copy(h[8:], src[:])
		copy(h[24:], dst[:])
	}
	return append(append(append(b, h...), ext...), l4...)
}
