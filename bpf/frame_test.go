package bpf_test

import (
	"encoding/binary"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// pkt is a tu.Frame with the fields the stateful rules read set after it
// is built: the IP identification, TCP flags, an echo's identifier and an
// ICMP error's quoted packet. Like tu.Frame it follows the RFCs, not the
// parser.
type pkt struct {
	tu.Frame
	// IPID is the IPv4 identification (16 bits) or the identification of
	// the IPv6 fragment header (the first 44 in IPv6Ext).
	IPID uint32
	// TCPFlags replaces the SYN tu.Frame sets, when non-zero.
	TCPFlags uint8
	// EchoID is an ICMP message's identifier field (bytes 4-5).
	EchoID uint16
	// Quote is the body of an ICMP message after its 8-byte header.
	Quote []byte
}

// ipv6ExtLen is the length tu.Frame gives an extension header of type t.
func ipv6ExtLen(t uint8) int {
	if t == 44 {
		return 8
	}
	return 16
}

func (p pkt) Bytes() []byte {
	f := p.Frame
	if p.Quote != nil {
		f.Payload = len(p.Quote)
	}
	b := f.Bytes()
	l3 := 14 + 4*len(f.VLANs)
	var l4, fragHdr int
	switch {
	case f.EtherType != 0 && f.EtherType != 0x0800 && f.EtherType != 0x86DD:
		return b
	case f.Src.Is4():
		l4 = l3 + 20 + f.IPv4Options
		binary.BigEndian.PutUint16(b[l3+4:], uint16(p.IPID))
	default:
		l4 = l3 + 40
		fragHdr = -1
		for _, t := range f.IPv6Ext {
			if t == 44 && fragHdr < 0 {
				fragHdr = l4
			}
			l4 += ipv6ExtLen(t)
		}
		if fragHdr >= 0 {
			binary.BigEndian.PutUint32(b[fragHdr+4:], p.IPID)
		}
	}
	switch f.Proto {
	case tu.ProtoTCP:
		if p.TCPFlags != 0 {
			b[l4+13] = p.TCPFlags
		}
	case tu.ProtoICMP, tu.ProtoICMPv6:
		binary.BigEndian.PutUint16(b[l4+4:], p.EchoID)
		copy(b[l4+8:], p.Quote)
	}
	return b
}

// ipPacket is the IP packet of p without its Ethernet header (and tags):
// what an ICMP error quotes.
func ipPacket(p pkt) []byte {
	p.VLANs = nil
	return p.Bytes()[14:]
}

// quoteOf is the start of the packet p that an ICMP error carries: its IP
// header (with options or IPv6 extension headers) and n bytes after it.
func quoteOf(p pkt, n int) []byte {
	ip := ipPacket(p)
	hl := 40
	if p.Src.Is4() {
		hl = 20 + p.IPv4Options
	} else {
		for _, t := range p.IPv6Ext {
			hl += ipv6ExtLen(t)
		}
	}
	return ip[:min(len(ip), hl+n)]
}
