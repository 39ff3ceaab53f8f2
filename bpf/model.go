package bpf

import (
	"encoding/binary"
	"net/netip"
	"time"
)

// This file is the reference model of aegis.c: the verdict written as plain
// Go, so that it can be read as the specification and compared with the C
// implementation packet by packet (model_test.go). Keep the two in step.

// XDP actions, from the kernel UAPI.
const (
	XDPDrop = 1
	XDPPass = 2
)

// RefreshGranularity mirrors AEGIS_REFRESH_NS: the data path rewrites a
// session's last_seen only when it is older than this.
const RefreshGranularity = 100 * time.Millisecond

// MaxIPv6ExtHeaders mirrors IPV6_MAX_EXT: the extension headers the data
// path skips before it gives up on a packet.
const MaxIPv6ExtHeaders = 6

// MaxAllowPorts mirrors ALLOW_MAX_PORTS: the (protocol, port) pairs that
// apply to one allow-list prefix, including those inherited from covering
// prefixes.
const MaxAllowPorts = 16

// LayoutVersion is AEGIS_LAYOUT_VERSION: the version of every map's key
// and value layout, recorded in the config map.
const LayoutVersion = uint32(AegisLayoutLAYOUT_VERSION)

// StatsSlots mirrors STATS_SLOTS, the entries of the stats map.
const StatsSlots = 32

// Reason is why the data path passed or dropped a packet: the index of its
// counter in the stats map.
type Reason uint32

// The reasons, as numbered by enum reason in aegis.c.
const (
	ReasonSession       = Reason(AegisReasonREASON_SESSION)
	ReasonController    = Reason(AegisReasonREASON_CONTROLLER)
	ReasonAllowlist     = Reason(AegisReasonREASON_ALLOWLIST)
	ReasonARP           = Reason(AegisReasonREASON_ARP)
	ReasonNDP           = Reason(AegisReasonREASON_NDP)
	ReasonMonitor       = Reason(AegisReasonREASON_MONITOR)
	ReasonNoSession     = Reason(AegisReasonREASON_NO_SESSION)
	ReasonExpired       = Reason(AegisReasonREASON_EXPIRED)
	ReasonMalformed     = Reason(AegisReasonREASON_MALFORMED)
	ReasonFragment      = Reason(AegisReasonREASON_FRAGMENT)
	ReasonUnsupportedL3 = Reason(AegisReasonREASON_UNSUPPORTED_L3)
	ReasonUnsupportedL4 = Reason(AegisReasonREASON_UNSUPPORTED_L4)
)

// Reasons lists every reason in counter order.
var Reasons = []Reason{
	ReasonSession, ReasonController, ReasonAllowlist, ReasonARP, ReasonNDP, ReasonMonitor,
	ReasonNoSession, ReasonExpired, ReasonMalformed, ReasonFragment,
	ReasonUnsupportedL3, ReasonUnsupportedL4,
}

var reasonNames = map[Reason]string{
	ReasonSession:       "session",
	ReasonController:    "controller",
	ReasonAllowlist:     "allowlist",
	ReasonARP:           "arp",
	ReasonNDP:           "ndp",
	ReasonMonitor:       "monitor",
	ReasonNoSession:     "no_session",
	ReasonExpired:       "expired",
	ReasonMalformed:     "malformed",
	ReasonFragment:      "fragment",
	ReasonUnsupportedL3: "unsupported_l3",
	ReasonUnsupportedL4: "unsupported_l4",
}

// String returns the reason's name as used in metrics and aegisctl.
func (r Reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return "unknown"
}

// Pass reports whether packets with this reason pass.
func (r Reason) Pass() bool { return r < ReasonNoSession }

// Verdict returns "pass" or "drop".
func (r Reason) Verdict() string {
	if r.Pass() {
		return "pass"
	}
	return "drop"
}

// AllowRule is one static allow rule: traffic from Prefix passes, limited to
// Proto (0: any) and destination Port (0: any).
type AllowRule struct {
	Prefix netip.Prefix
	Proto  uint8
	Port   uint16
}

// Matches reports whether the rule lets a packet through.
func (r AllowRule) Matches(src netip.Addr, proto uint8, port uint16) bool {
	return r.Prefix.Contains(src) &&
		(r.Proto == 0 || r.Proto == proto) &&
		(r.Port == 0 || r.Port == port)
}

// SessionVerdict decides whether a session passes traffic at now (the data
// path's clock, see aegis.c). It returns ReasonSession or ReasonExpired, and
// whether the data path rewrites last_seen. defaultIdle is the config map's
// default idle timeout, used when the session has none of its own.
func SessionVerdict(v *AegisSessionValue, defaultIdle, now uint64) (r Reason, refresh bool) {
	if v.ExpiresNs != 0 && now >= v.ExpiresNs {
		return ReasonExpired, false
	}
	idle := v.IdleTimeoutNs
	if idle == 0 {
		idle = defaultIdle
	}
	age := int64(now - v.LastSeenNs)
	if age > int64(idle) {
		return ReasonExpired, false
	}
	return ReasonSession, age > int64(RefreshGranularity)
}

// Env is everything besides the packet that the verdict depends on.
type Env struct {
	Config     AegisConfigValue
	Now        uint64
	SessionsV4 map[AegisSessionKeyV4]*AegisSessionValue
	SessionsV6 map[AegisSessionKeyV6]*AegisSessionValue
	Allow      []AllowRule
	// Local is the gateway's routing table as the data path asks it
	// (bpf_fib_lookup from the ingress interface): whether a packet for
	// the unicast address dst is not forwarded (BPF_FIB_LKUP_RET_NOT_FWDED):
	// one of the gateway's own, broadcast or anycast addresses, an IPv6
	// link-local or loopback address, or an address with no route. Nil:
	// nothing is, as on a gateway with forwarding off (FWD_DISABLED).
	Local func(dst netip.Addr) bool
}

// Verdict returns the XDP action and the counted reason for one frame, and
// refreshes last_seen in env's sessions as the data path does.
func Verdict(pkt []byte, env *Env) (action int, reason Reason) {
	r := classify(pkt, env)
	switch {
	case r.Pass():
		return XDPPass, r
	case env.Config.Monitor != 0:
		return XDPPass, ReasonMonitor
	default:
		return XDPDrop, r
	}
}

const (
	ethPIPv4   = 0x0800
	ethPARP    = 0x0806
	ethP8021Q  = 0x8100
	ethP8021AD = 0x88A8
	ethPIPv6   = 0x86DD

	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
)

func classify(pkt []byte, env *Env) Reason {
	if len(pkt) < 14 {
		return ReasonMalformed
	}
	off := 14
	proto := binary.BigEndian.Uint16(pkt[12:])
	for i := 0; i < 2 && (proto == ethP8021Q || proto == ethP8021AD); i++ {
		if off+4 > len(pkt) {
			return ReasonMalformed
		}
		proto = binary.BigEndian.Uint16(pkt[off+2:])
		off += 4
	}
	switch proto {
	case ethPIPv4:
		return classifyV4(pkt, off, env)
	case ethPIPv6:
		return classifyV6(pkt, off, env)
	case ethPARP:
		return ReasonARP
	default:
		return ReasonUnsupportedL3
	}
}

// l4Port returns the destination port of a TCP or UDP header at off that
// must end within both the frame and the IP datagram (l3end).
func l4Port(pkt []byte, proto uint8, off, l3end int) (uint16, Reason, bool) {
	var hlen int
	switch proto {
	case protoTCP:
		hlen = 20
	case protoUDP:
		hlen = 8
	default:
		return 0, ReasonUnsupportedL4, false
	}
	if off+hlen > len(pkt) || off+hlen > l3end {
		return 0, ReasonMalformed, false
	}
	return binary.BigEndian.Uint16(pkt[off+2:]), 0, true
}

func classifyV4(pkt []byte, off int, env *Env) Reason {
	if off+20 > len(pkt) || pkt[off]>>4 != 4 {
		return ReasonMalformed
	}
	ihl := int(pkt[off]&0xF) * 4
	tot := int(binary.BigEndian.Uint16(pkt[off+2:]))
	if ihl < 20 || tot < ihl || off+tot > len(pkt) {
		return ReasonMalformed
	}
	if binary.BigEndian.Uint16(pkt[off+6:])&0x1FFF != 0 {
		return ReasonFragment
	}
	proto := pkt[off+9]
	dport, r, ok := l4Port(pkt, proto, off+ihl, off+tot)
	if !ok {
		return r
	}
	var src, dst [4]byte
	copy(src[:], pkt[off+12:])
	copy(dst[:], pkt[off+16:])

	cfg := &env.Config
	if cfg.ControllerFamily == 4 && proto == protoTCP {
		if dst == cfg.ControllerV4 && dport == cfg.ControllerPort {
			return ReasonController
		}
		if src == cfg.ControllerV4 && dport == cfg.GrpcPort && env.deliveredLocallyV4(dst) {
			return ReasonController
		}
	}

	r = ReasonNoSession
	key := AegisSessionKeyV4{Src: src, Dst: dst, Dport: dport, Proto: proto}
	if v, ok := env.SessionsV4[key]; ok {
		if r = env.session(v); r == ReasonSession {
			return r
		}
	}
	if cfg.AllowV4Rules != 0 && env.allowed(netip.AddrFrom4(src), proto, dport) {
		return ReasonAllowlist
	}
	return r
}

func classifyV6(pkt []byte, off int, env *Env) Reason {
	if off+40 > len(pkt) || pkt[off]>>4 != 6 {
		return ReasonMalformed
	}
	l3end := off + 40 + int(binary.BigEndian.Uint16(pkt[off+4:]))
	if l3end > len(pkt) {
		return ReasonMalformed
	}
	var src, dst [16]byte
	copy(src[:], pkt[off+8:])
	copy(dst[:], pkt[off+24:])

	nh := pkt[off+6]
	p := off + 40
walk:
	for i := 0; i < MaxIPv6ExtHeaders; i++ {
		var hlen int
		switch nh {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if p+8 > len(pkt) {
				return ReasonMalformed
			}
			hlen = (int(pkt[p+1]) + 1) * 8
		case 51: // authentication header
			if p+8 > len(pkt) {
				return ReasonMalformed
			}
			hlen = (int(pkt[p+1]) + 2) * 4
		case 44: // fragment
			if p+8 > len(pkt) {
				return ReasonMalformed
			}
			if binary.BigEndian.Uint16(pkt[p+2:])&0xFFF8 != 0 {
				return ReasonFragment
			}
			hlen = 8
		default:
			break walk // the upper-layer header
		}
		nh = pkt[p]
		p += hlen
	}

	if nh == protoICMPv6 {
		if p+4 > len(pkt) || p+4 > l3end {
			return ReasonMalformed
		}
		if env.ndpBypass(pkt[p], pkt[p+1], pkt[off+7], dst) {
			return ReasonNDP
		}
		return ReasonUnsupportedL4
	}

	dport, r, ok := l4Port(pkt, nh, p, l3end)
	if !ok {
		return r
	}

	cfg := &env.Config
	if cfg.ControllerFamily == 6 && nh == protoTCP {
		if dst == cfg.ControllerV6 && dport == cfg.ControllerPort {
			return ReasonController
		}
		if src == cfg.ControllerV6 && dport == cfg.GrpcPort && env.deliveredLocallyV6(dst) {
			return ReasonController
		}
	}

	r = ReasonNoSession
	key := AegisSessionKeyV6{Src: src, Dst: dst, Dport: dport, Proto: nh}
	if v, ok := env.SessionsV6[key]; ok {
		if r = env.session(v); r == ReasonSession {
			return r
		}
	}
	if cfg.AllowV6Rules != 0 && env.allowed(netip.AddrFrom16(src), nh, dport) {
		return ReasonAllowlist
	}
	return r
}

// deliveredLocallyV4 and deliveredLocallyV6 mirror delivered_locally_v4
// and _v6: a unicast destination that the routing table does not forward.
// Addresses are tested as bytes, as the C does; netip's predicates would
// treat IPv4-mapped IPv6 addresses as IPv4 ones.
func (env *Env) deliveredLocallyV4(dst [4]byte) bool {
	if dst[0]&0xF0 == 0xE0 { // 224.0.0.0/4
		return false
	}
	return env.Local != nil && env.Local(netip.AddrFrom4(dst))
}

func (env *Env) deliveredLocallyV6(dst [16]byte) bool {
	if dst[0] == 0xFF { // ff00::/8
		return false
	}
	return env.Local != nil && env.Local(netip.AddrFrom16(dst))
}

// ndpBypass mirrors ndp_bypass: neighbour discovery that was not routed
// (RFC 4861: hop limit 255, code 0) to a destination on the link it came
// from: link-local, link-scope multicast or the gateway's own.
func (env *Env) ndpBypass(typ, code, hopLimit uint8, dst [16]byte) bool {
	if typ < 133 || typ > 137 || code != 0 || hopLimit != 255 {
		return false
	}
	switch {
	case dst[0] == 0xFE && dst[1]&0xC0 == 0x80: // fe80::/10
		return true
	case dst[0] == 0xFF && dst[1] == 0x02: // ff02::/16
		return true
	}
	return env.deliveredLocallyV6(dst)
}

func (env *Env) session(v *AegisSessionValue) Reason {
	r, refresh := SessionVerdict(v, env.Config.DefaultIdleTimeoutNs, env.Now)
	if refresh {
		v.LastSeenNs = env.Now
	}
	return r
}

func (env *Env) allowed(src netip.Addr, proto uint8, port uint16) bool {
	for _, rule := range env.Allow {
		if rule.Matches(src, proto, port) {
			return true
		}
	}
	return false
}
