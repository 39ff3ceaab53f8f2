package testutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Packets for real network stacks: unlike Frame, these carry correct
// checksums, so that the receiving kernel accepts them, and any header
// field, the source address included, is the test's to choose.

// TCP flags.
const (
	TCPSyn = 0x02
	TCPRst = 0x04
	TCPAck = 0x10
)

// ICMPv6 neighbour discovery types (RFC 4861).
const (
	NDPNeighbourSolicitation  = 135
	NDPNeighbourAdvertisement = 136
)

// TCPPacket returns an IPv4 or IPv6 packet with a TCP segment (no options,
// no payload) from src to dst.
func TCPPacket(src, dst netip.AddrPort, flags uint8, hopLimit uint8) []byte {
	seg := make([]byte, 20)
	binary.BigEndian.PutUint16(seg[0:], src.Port())
	binary.BigEndian.PutUint16(seg[2:], dst.Port())
	binary.BigEndian.PutUint32(seg[4:], 0x1000)
	seg[12] = 5 << 4
	seg[13] = flags
	binary.BigEndian.PutUint16(seg[14:], 64240)
	return ipPacket(src.Addr(), dst.Addr(), ProtoTCP, hopLimit, seg, 16)
}

// ICMPv6Packet returns an IPv6 packet with an ICMPv6 message whose body
// follows the 4-byte type, code and checksum.
func ICMPv6Packet(src, dst netip.Addr, hopLimit, typ, code uint8, body []byte) []byte {
	msg := append([]byte{typ, code, 0, 0}, body...)
	return ipPacket(src, dst, ProtoICMPv6, hopLimit, msg, 2)
}

// NeighbourSolicitation is the body of a neighbour solicitation for target
// with the sender's link-layer address option.
func NeighbourSolicitation(target netip.Addr, mac net.HardwareAddr) []byte {
	b := make([]byte, 4, 4+16+8) // reserved
	t := target.As16()
	b = append(b, t[:]...)
	return append(append(b, 1, 1), mac...) // option 1: source link-layer address, 8 bytes
}

// NeighbourAdvertisement is the body of a solicited, overriding neighbour
// advertisement for target with the target link-layer address option.
func NeighbourAdvertisement(target netip.Addr, mac net.HardwareAddr) []byte {
	b := []byte{0x60, 0, 0, 0} // S and O flags
	t := target.As16()
	b = append(b, t[:]...)
	return append(append(b, 2, 1), mac...) // option 2: target link-layer address
}

// ipPacket wraps an upper-layer message in an IP header and fills in its
// checksum at csumOff (over the pseudo-header, RFC 793 and RFC 8200 §8.1).
func ipPacket(src, dst netip.Addr, proto, hopLimit uint8, l4 []byte, csumOff int) []byte {
	var h, pseudo []byte
	s, d := src.AsSlice(), dst.AsSlice()
	if src.Is4() {
		h = make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
		h[6] = 0x40 // don't fragment
		h[8], h[9] = hopLimit, proto
		copy(h[12:], s)
		copy(h[16:], d)
		binary.BigEndian.PutUint16(h[10:], ^checksum(0, h))
		pseudo = append(append(append([]byte{}, s...), d...), 0, proto, byte(len(l4)>>8), byte(len(l4)))
	} else {
		h = make([]byte, 40)
		h[0] = 6 << 4
		binary.BigEndian.PutUint16(h[4:], uint16(len(l4)))
		h[6], h[7] = proto, hopLimit
		copy(h[8:], s)
		copy(h[24:], d)
		pseudo = append(append(append([]byte{}, s...), d...), 0, 0, byte(len(l4)>>8), byte(len(l4)), 0, 0, 0, proto)
	}
	binary.BigEndian.PutUint16(l4[csumOff:], ^checksum(checksum(0, pseudo), l4))
	return append(h, l4...)
}

// checksum adds b to the ones' complement sum sum.
func checksum(sum uint16, b []byte) uint16 {
	s := uint32(sum)
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xFFFF {
		s = s>>16 + s&0xFFFF
	}
	return uint16(s)
}

// Packet is what Link.Expect matches on: an IP packet received on the link.
type Packet struct {
	Src, Dst netip.Addr
	Proto    uint8
	HopLimit uint8
	L4       []byte // the upper-layer header and payload
}

// TCPPorts returns the segment's ports and flags.
func (p Packet) TCPPorts() (src, dst uint16, flags uint8, ok bool) {
	if p.Proto != ProtoTCP || len(p.L4) < 20 {
		return 0, 0, 0, false
	}
	return binary.BigEndian.Uint16(p.L4), binary.BigEndian.Uint16(p.L4[2:]), p.L4[13], true
}

func parsePacket(frame []byte) (Packet, bool) {
	if len(frame) < 14 {
		return Packet{}, false
	}
	b := frame[14:]
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		if len(b) < 20 || b[0]>>4 != 4 {
			return Packet{}, false
		}
		ihl := int(b[0]&0xF) * 4
		if ihl < 20 || len(b) < ihl {
			return Packet{}, false
		}
		return Packet{Src: netip.AddrFrom4([4]byte(b[12:16])), Dst: netip.AddrFrom4([4]byte(b[16:20])),
			Proto: b[9], HopLimit: b[8], L4: b[ihl:]}, true
	case 0x86DD:
		if len(b) < 40 || b[0]>>4 != 6 {
			return Packet{}, false
		}
		return Packet{Src: netip.AddrFrom16([16]byte(b[8:24])), Dst: netip.AddrFrom16([16]byte(b[24:40])),
			Proto: b[6], HopLimit: b[7], L4: b[40:]}, true
	}
	return Packet{}, false
}

// Link is a packet socket on one interface of a namespace: it sends
// Ethernet frames as given and receives every frame that arrives on the
// interface from the time it is opened.
type Link struct {
	fd      int
	ifindex int
	// MAC is the interface's address.
	MAC net.HardwareAddr
}

// OpenLink opens a Link on iface in the namespace; it closes when t ends.
func (n *Netns) OpenLink(t testing.TB, iface string) *Link {
	t.Helper()
	l := &Link{fd: -1}
	err := n.Do(func() error {
		ifc, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		l.ifindex, l.MAC = ifc.Index, ifc.HardwareAddr
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("open packet socket: %w", err)
		}
		l.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			return fmt.Errorf("bind packet socket to %s: %w", iface, err)
		}
		// Reads return at least this often, so that Expect can give up.
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 50_000})
	})
	if l.fd >= 0 {
		t.Cleanup(func() { unix.Close(l.fd) })
	}
	if err != nil {
		t.Fatalf("open link %s in %s: %v", iface, n.Name, err)
	}
	return l
}

// Send writes an Ethernet frame carrying the IP packet pkt to dst.
func (l *Link) Send(t testing.TB, dst net.HardwareAddr, pkt []byte) {
	t.Helper()
	et := uint16(0x0800)
	if pkt[0]>>4 == 6 {
		et = 0x86DD
	}
	frame := append(append(append([]byte{}, dst...), l.MAC...), byte(et>>8), byte(et))
	frame = append(frame, pkt...)
	if err := unix.Sendto(l.fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: l.ifindex}); err != nil {
		t.Fatalf("send on link %d: %v", l.ifindex, err)
	}
}

// Expect reads arriving frames until one carries an IP packet that match
// accepts, and reports whether one did within timeout. Frames the
// interface sends are not considered.
func (l *Link) Expect(timeout time.Duration, match func(Packet) bool) bool {
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); {
		n, from, err := unix.Recvfrom(l.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if p, ok := parsePacket(buf[:n]); ok && match(p) {
			return true
		}
	}
	return false
}

// htons returns v in network byte order, as packet sockets take the
// protocol.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
