package bpf

import (
	"encoding/binary"
	"net/netip"
	"time"
)

// This file is the reference model of aegis.c: both programs written as
// plain Go, so that they can be read as the specification and compared
// with the C implementation packet by packet (model_test.go). Keep the two
// in step. Every constant the two share comes from the object's BTF.

// RefreshGranularity is AEGIS_REFRESH_NS: the data path rewrites a
// session's or flow's last_seen only when it is older than this.
const RefreshGranularity = time.Duration(AegisLimitsLIMIT_REFRESH_NS)

// MaxIPv6ExtHeaders is IPV6_MAX_EXT: the extension headers the data path
// skips before it gives up on a packet.
const MaxIPv6ExtHeaders = int(AegisLimitsLIMIT_IPV6MAX_EXT)

// MaxAllowPorts is ALLOW_MAX_PORTS: the (protocol, port) pairs that apply
// to one allow-list prefix, including those inherited from covering
// prefixes.
const MaxAllowPorts = int(AegisLimitsLIMIT_ALLOW_MAX_PORTS)

// LayoutVersion is AEGIS_LAYOUT_VERSION: the version of every map's key
// and value layout, recorded in the config map.
const LayoutVersion = uint32(AegisLayoutLAYOUT_VERSION)

// StatsSlots is STATS_SLOTS, the entries of the stats map.
const StatsSlots = int(AegisLimitsLIMIT_STATS_SLOTS)

// FragTimeout is FRAG_TIMEOUT_NS: how long the later fragments of a
// datagram whose first fragment passed keep passing.
const FragTimeout = time.Duration(AegisLimitsLIMIT_FRAG_TIMEOUT_NS)

// Action is what the XDP program returns for a frame.
type Action int

// XDP actions, from the kernel UAPI.
const (
	XDPDrop Action = 1
	XDPPass Action = 2
)

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
	ReasonReply         = Reason(AegisReasonREASON_REPLY)
	ReasonICMPRelated   = Reason(AegisReasonREASON_ICMP_RELATED)
)

// Reasons lists every reason in counter order.
var Reasons = []Reason{
	ReasonSession, ReasonController, ReasonAllowlist, ReasonARP, ReasonNDP, ReasonMonitor,
	ReasonNoSession, ReasonExpired, ReasonMalformed, ReasonFragment,
	ReasonUnsupportedL3, ReasonUnsupportedL4, ReasonReply, ReasonICMPRelated,
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
	ReasonReply:         "reply",
	ReasonICMPRelated:   "icmp_related",
}

// String returns the reason's name as used in metrics and aegisctl.
func (r Reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return "unknown"
}

// passReasons is the data path's verdict table, PASS_REASONS: bit r is set
// when reason r passes.
const passReasons = uint32(AegisVerdictPASS_REASONS)

// Action is what the data path does with a packet of this reason outside
// monitor mode.
func (r Reason) Action() Action {
	if passReasons>>(r&31)&1 != 0 {
		return XDPPass
	}
	return XDPDrop
}

// Pass reports whether packets with this reason pass.
func (r Reason) Pass() bool { return r.Action() == XDPPass }

// Verdict returns "pass" or "drop".
func (r Reason) Verdict() string { return r.Action().Verdict() }

// Verdict spells the action as operators read it: "pass" for XDP_PASS,
// "drop" for everything else.
func (a Action) Verdict() string {
	if a == XDPPass {
		return "pass"
	}
	return "drop"
}

// AllowRule is one static allow rule: traffic from Prefix passes, limited to
// Proto (0: any) and destination Port (0: any; ICMP has no port and matches
// only rules of port 0).
type AllowRule struct {
	Prefix netip.Prefix
	Proto  uint8
	Port   uint16
}

// Matches reports whether the rule lets a packet through.
func (r AllowRule) Matches(src netip.Addr, proto uint8, port uint16) bool {
	if proto == protoICMP || proto == protoICMPv6 {
		port = 0
	}
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

// FlowIdle is the idle timeout the config gives flows of the protocol.
func FlowIdle(cfg *AegisConfigValue, proto uint8) uint64 {
	switch proto {
	case protoTCP:
		return cfg.FlowIdleTcpNs
	case protoUDP:
		return cfg.FlowIdleUdpNs
	}
	return cfg.FlowIdleIcmpNs
}

// FlowVerdict decides whether a flow is live at now, and whether the data
// path rewrites its last_seen. A flow that is not live counts as absent.
func FlowVerdict(v *AegisFlowValue, idle, now uint64) (live, refresh bool) {
	return seenVerdict(v.LastSeenNs, idle, now)
}

// seenVerdict is how flows and tombstones age (seen_live in aegis.c):
// live while idle for at most idle, and rewritten when last seen longer
// ago than RefreshGranularity.
func seenVerdict(lastSeen, idle, now uint64) (live, refresh bool) {
	age := int64(now - lastSeen)
	if age > int64(idle) {
		return false, false
	}
	return true, age > int64(RefreshGranularity)
}

// TombIdle is how long a tombstone lives without a refused packet: the
// UDP flow idle timeout, whatever the key's protocol (aegis.c says why).
func TombIdle(cfg *AegisConfigValue) uint64 { return cfg.FlowIdleUdpNs }

// TombVerdict decides whether a tombstone still refuses flows at now, and
// whether the egress program rewrites its last_seen. One that does not
// counts as absent, and the reaper deletes it.
func TombVerdict(v *AegisTombValue, idle, now uint64) (live, refresh bool) {
	return seenVerdict(v.LastSeenNs, idle, now)
}

// Env is everything besides the packet that the verdict depends on, and
// the state both programs write.
type Env struct {
	Config     AegisConfigValue
	Now        uint64
	SessionsV4 map[AegisSessionKeyV4]*AegisSessionValue
	SessionsV6 map[AegisSessionKeyV6]*AegisSessionValue
	FlowsV4    map[AegisFlowKeyV4]*AegisFlowValue
	FlowsV6    map[AegisFlowKeyV6]*AegisFlowValue
	Frags      map[AegisFragKey]*AegisFragValue
	// AllowV4 and AllowV6 are the allow maps' entries, as the loader
	// compiles them from the rules (each prefix holds the pairs of the
	// prefixes covering it, each pair its rule's id).
	AllowV4 map[AegisAllowKeyV4]AegisAllowValue
	AllowV6 map[AegisAllowKeyV6]AegisAllowValue
	// AllowHits counts the packets each allow rule admitted, by
	// AllowHitSlot, as allow_hits does; Verdict allocates it.
	AllowHits map[uint32]uint64
	// TombsV4 and TombsV6 are the removed sessions' tombstones, which the
	// egress program reads and refreshes.
	TombsV4 map[AegisSessionKeyV4]*AegisTombValue
	TombsV6 map[AegisSessionKeyV6]*AegisTombValue
	// Local is the gateway's routing table as the data path asks it
	// (bpf_fib_lookup from the ingress interface): whether a packet for
	// the unicast address dst is not forwarded (BPF_FIB_LKUP_RET_NOT_FWDED):
	// one of the gateway's own, broadcast or anycast addresses, an IPv6
	// link-local or loopback address, or an address with no route. Nil:
	// nothing is, as on a gateway with forwarding off (FWD_DISABLED).
	Local func(dst netip.Addr) bool

	// Late, when set, is the latest the program's clock can read for this
	// packet (Now the earliest). A decision that differs between the two
	// sets Ambiguous; only a fragment's expiry can, since every other
	// deadline a test sets is far from its clock.
	Late      uint64
	Ambiguous bool

	// Ifindex is the ingress interface, which events carry.
	Ifindex uint32
	// EventLimits are the rate limiter buckets of the CPU the frame runs
	// on, by EventKind; Verdict updates them as the program does.
	EventLimits [EventKinds]AegisEventLimit
	// Events collects the verdict events the frames emitted. The model's
	// ring buffer always has room: it never counts an event lost.
	Events []AegisEvent

	// onFragment, set by tests, hears of every fragmented datagram the
	// model remembers, so that they can adopt the kernel's timestamp.
	onFragment func(AegisFragKey)
}

// mutation, set only by tests (export_test.go), breaks one rule of the
// model on purpose, to show that the differential test notices.
var mutation string

// Verdict returns the XDP action and the counted reason for one frame, and
// updates env as the data path does: last_seen of sessions and flows, the
// fragments of datagrams whose first fragment passed.
//
// It also samples the verdict into env.Events, rate limited by
// env.EventLimits (see event).
func Verdict(pkt []byte, env *Env) (Action, Reason) {
	var ip ipInfo
	cause := env.classify(pkt, &ip)
	action, r := XDPDrop, cause
	switch {
	case cause.Pass():
		action = XDPPass
	case env.Config.Monitor != 0:
		action, r = XDPPass, ReasonMonitor
	}
	env.event(&ip.t, r, cause, action, len(pkt))
	return action, r
}

// FlowWrite is what the egress program did to the flow table.
type FlowWrite int

// The egress program's outcomes.
const (
	FlowNone    FlowWrite = iota // not a packet that opens or keeps a flow
	FlowKept                     // a live flow; last_seen refreshed if stale
	FlowCreated                  // a new flow (or one that had expired)
	FlowRefused                  // could open a flow, but its reply is already admitted or was a removed session's
)

// Egress models aegis_egress for one outgoing frame: it updates env's flow
// tables and returns what it did and the reply tuple's key (an
// AegisFlowKeyV4 or AegisFlowKeyV6), nil for a frame that is not TCP, UDP
// or an echo request.
func Egress(pkt []byte, env *Env) (FlowWrite, any) {
	if env.Config.TrackFlows == 0 {
		return FlowNone, nil
	}
	et, l3, ok := parseL2(pkt)
	if !ok {
		return FlowNone, nil
	}
	var ip ipInfo
	var r Reason
	switch et {
	case ethPIPv4:
		ip, r = parseIPv4(pkt, l3)
	case ethPIPv6:
		ip, r = parseIPv6(pkt, l3)
	default:
		return FlowNone, nil
	}
	if r != reasonNone || ip.frag == fragLater {
		return FlowNone, nil
	}
	if parseL4(pkt, &ip) != reasonNone {
		return FlowNone, nil
	}
	return env.record(&ip.t)
}

func (env *Env) record(o *tuple) (FlowWrite, any) {
	if o.kind != l4Ports && o.kind != l4EchoRequest {
		return FlowNone, nil
	}
	r := o.reverse()
	if f := env.flow(&r); f != nil {
		if live, refresh := FlowVerdict(f, FlowIdle(&env.Config, r.proto), env.Now); live {
			if refresh {
				f.LastSeenNs = env.Now
			}
			return FlowKept, r.flowKey()
		}
	}
	if o.proto == protoTCP && o.tcpFlags&(tcpSYN|tcpACK) != tcpSYN &&
		(mutation != "egress-synack" || o.tcpFlags&tcpSYN == 0) {
		return FlowNone, r.flowKey()
	}
	if r.kind == l4Ports && (env.session(&r, r.proto) != nil || env.session(&r, 0) != nil) {
		return FlowRefused, r.flowKey()
	}
	if r.kind == l4Ports && mutation != "egress-no-tomb" {
		exact, anyProto := env.tombRefuses(&r, r.proto), env.tombRefuses(&r, 0)
		if exact || anyProto {
			return FlowRefused, r.flowKey()
		}
	}
	if env.allowed(&r) {
		return FlowRefused, r.flowKey()
	}
	v := &AegisFlowValue{LastSeenNs: env.Now, CreatedNs: env.Now}
	switch k := r.flowKey().(type) {
	case AegisFlowKeyV4:
		env.FlowsV4[k] = v
	case AegisFlowKeyV6:
		env.FlowsV6[k] = v
	}
	return FlowCreated, r.flowKey()
}

// Header layouts: offsets of the fields read, from the RFCs.
const (
	ethHdrLen   = 14
	ethTypeOff  = 12
	vlanHdrLen  = 4
	vlanTypeOff = 2
	maxVLANTags = 2

	ipv4MinHdrLen  = 20
	ipv4TotLenOff  = 2
	ipv4IDOff      = 4
	ipv4FragOff    = 6
	ipv4ProtoOff   = 9
	ipv4SrcOff     = 12
	ipv4DstOff     = 16
	ipv4OffsetMask = 0x1FFF
	ipv4MF         = 0x2000

	ipv6HdrLen        = 40
	ipv6PayloadLenOff = 4
	ipv6NextOff       = 6
	ipv6HopLimitOff   = 7
	ipv6SrcOff        = 8
	ipv6DstOff        = 24
	ipv6ExtMinLen     = 8 // every extension header; exactly the fragment header
	ipv6FragOffOff    = 2
	ipv6FragIDOff     = 4
	ipv6OffsetMask    = 0xFFF8
	ipv6M             = 0x0001

	tcpHdrLen   = 20
	tcpFlagsOff = 13
	tcpSYN      = 0x02
	tcpACK      = 0x10
	udpHdrLen   = 8
	icmpHdrLen  = 8 // ICMP and ICMPv6: type, code, checksum, identifier, sequence
	icmpIDOff   = 4
	icmp6MinLen = 4 // what neighbour discovery is recognised by
)

const (
	ethPIPv4   = 0x0800
	ethPARP    = 0x0806
	ethP8021Q  = 0x8100
	ethP8021AD = 0x88A8
	ethPIPv6   = 0x86DD

	protoHopOpts  = 0
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoRouting  = 43
	protoFragment = 44
	protoAH       = 51
	protoICMPv6   = 58
	protoDstOpts  = 60

	icmpEchoReply      = 0
	icmpDestUnreach    = 3
	icmpEcho           = 8
	icmpTimeExceeded   = 11
	icmpParamProblem   = 12
	icmp6DestUnreach   = 1
	icmp6ParamProblem  = 4
	icmp6EchoRequest   = 128
	icmp6EchoReply     = 129
	ndpRouterSolicit   = 133
	ndpRedirect        = 137
	quoteUnmatchableL4 = 0xFF // a quoted later fragment: no L4 header
)

// reasonNone is "no verdict yet" while parsing: REASON_SESSION is 0 in C,
// which the C code never returns from a parser, so the model uses a value
// no reason has.
const reasonNone = Reason(^uint32(0))

type l4Kind uint8

const (
	l4Ports l4Kind = iota
	l4EchoRequest
	l4EchoReply
	l4ICMPError
	l4ICMPOther
)

// tuple is struct tuple: one shape for both families, IPv4 addresses in the
// first 4 bytes.
type tuple struct {
	src, dst     [16]byte
	sport, dport uint16
	proto        uint8
	family       uint8
	kind         l4Kind
	tcpFlags     uint8
}

func (t *tuple) reverse() tuple {
	r := tuple{src: t.dst, dst: t.src, sport: t.dport, dport: t.sport, proto: t.proto, family: t.family, kind: t.kind}
	if t.kind == l4EchoRequest {
		r.kind = l4EchoReply
	}
	return r
}

func (t *tuple) srcAddr() netip.Addr {
	if t.family == 4 {
		return netip.AddrFrom4([4]byte(t.src[:4]))
	}
	return netip.AddrFrom16(t.src)
}

func (t *tuple) flowKey() any {
	if t.family == 4 {
		return AegisFlowKeyV4{Src: [4]byte(t.src[:4]), Dst: [4]byte(t.dst[:4]), Sport: t.sport, Dport: t.dport, Proto: t.proto}
	}
	return AegisFlowKeyV6{Src: t.src, Dst: t.dst, Sport: t.sport, Dport: t.dport, Proto: t.proto}
}

type fragState uint8

const (
	fragNone fragState = iota
	fragFirst
	fragLater
)

// ipInfo is struct ip_info.
type ipInfo struct {
	t         tuple
	l4off     int
	l3end     int
	fragID    uint32
	fragProto uint8
	frag      fragState
	hopLimit  uint8
}

func (p *ipInfo) fragKey() AegisFragKey {
	return AegisFragKey{Src: p.t.src, Dst: p.t.dst, Id: p.fragID, Proto: p.fragProto, Family: p.t.family}
}

// sessionKeys are t's session keys with proto (session_key4 and
// session_key6 in aegis.c); sessions and tombstones share them.
func (t *tuple) sessionKeys(proto uint8) (AegisSessionKeyV4, AegisSessionKeyV6) {
	return AegisSessionKeyV4{Src: [4]byte(t.src[:4]), Dst: [4]byte(t.dst[:4]), Dport: t.dport, Proto: proto},
		AegisSessionKeyV6{Src: t.src, Dst: t.dst, Dport: t.dport, Proto: proto}
}

func (env *Env) session(t *tuple, proto uint8) *AegisSessionValue {
	k4, k6 := t.sessionKeys(proto)
	if t.family == 4 {
		return env.SessionsV4[k4]
	}
	return env.SessionsV6[k6]
}

func (env *Env) flow(t *tuple) *AegisFlowValue {
	switch k := t.flowKey().(type) {
	case AegisFlowKeyV4:
		return env.FlowsV4[k]
	case AegisFlowKeyV6:
		return env.FlowsV6[k]
	}
	return nil
}

func (env *Env) tomb(t *tuple, proto uint8) *AegisTombValue {
	k4, k6 := t.sessionKeys(proto)
	if t.family == 4 {
		return env.TombsV4[k4]
	}
	return env.TombsV6[k6]
}

// tombRefuses reports whether a live tombstone of proto refuses a flow for
// the reply r, refreshing it if so.
func (env *Env) tombRefuses(r *tuple, proto uint8) bool {
	v := env.tomb(r, proto)
	if v == nil {
		return false
	}
	live, refresh := TombVerdict(v, TombIdle(&env.Config), env.Now)
	if refresh {
		v.LastSeenNs = env.Now
	}
	return live
}

// sessionLive applies SessionVerdict, refreshing last_seen if asked.
func (env *Env) sessionLive(v *AegisSessionValue, refresh bool) bool {
	r, stale := SessionVerdict(v, env.Config.DefaultIdleTimeoutNs, env.Now)
	if r == ReasonSession && refresh && stale {
		v.LastSeenNs = env.Now
	}
	return r == ReasonSession
}

// flowLive applies FlowVerdict, refreshing last_seen if asked.
func (env *Env) flowLive(v *AegisFlowValue, proto uint8, refresh bool) bool {
	live, stale := FlowVerdict(v, FlowIdle(&env.Config, proto), env.Now)
	if live && refresh && stale {
		v.LastSeenNs = env.Now
	}
	return live
}

// allowMatch mirrors allow_match(): the entry of the longest prefix that
// holds the source, then the first of its pairs, in stored order, that
// admits the packet; nil for none.
func (env *Env) allowMatch(t *tuple) *AegisAllowPort {
	if t.family == 4 && env.Config.AllowV4Rules == 0 || t.family == 6 && env.Config.AllowV6Rules == 0 {
		return nil
	}
	src := t.srcAddr()
	var v *AegisAllowValue
	best := -1
	consider := func(p netip.Prefix, val AegisAllowValue) {
		if p.Bits() > best && p.Masked().Contains(src) {
			best, v = p.Bits(), &val
		}
	}
	if t.family == 4 {
		for k, val := range env.AllowV4 {
			consider(netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen)), val)
		}
	} else {
		for k, val := range env.AllowV6 {
			consider(netip.PrefixFrom(netip.AddrFrom16(k.Addr), int(k.Prefixlen)), val)
		}
	}
	if v == nil {
		return nil
	}
	port := t.dport
	if t.proto == protoICMP || t.proto == protoICMPv6 {
		port = 0
	}
	for i := range min(int(v.Count), MaxAllowPorts) {
		p := &v.Ports[i]
		if (p.Proto == 0 || p.Proto == t.proto) && (p.Port == 0 || p.Port == port) {
			return p
		}
	}
	return nil
}

func (env *Env) allowed(t *tuple) bool { return env.allowMatch(t) != nil }

// AllowRuleIDs is ALLOW_RULE_IDS: the hit counter slots of one family.
const AllowRuleIDs = int(AegisLimitsLIMIT_ALLOW_RULE_IDS)

// AllowHitSlot returns the allow_hits slot that counts the allow rule of
// the family (4 or 6) with the id: the family's slot 0 counts the pairs
// that carry no id.
func AllowHitSlot(family uint8, id uint8) uint32 {
	if family == 6 {
		return uint32(AllowRuleIDs) + uint32(id)
	}
	return uint32(id)
}

// allowHit counts a packet an allow rule admitted, as allow_hit() does.
func (env *Env) allowHit(family uint8, p *AegisAllowPort) {
	if env.AllowHits == nil {
		env.AllowHits = map[uint32]uint64{}
	}
	rule := p.Rule
	if mutation == "allow-hit-first-rule" && rule != 0 {
		rule = 1
	}
	env.AllowHits[AllowHitSlot(family, rule)]++
}

func (env *Env) controllerBypass(t *tuple) bool {
	cfg := &env.Config
	if t.proto != protoTCP || cfg.ControllerFamily != t.family {
		return false
	}
	ctl := cfg.ControllerV6[:]
	if t.family == 4 {
		ctl = cfg.ControllerV4[:]
	}
	n := len(ctl)
	if t.dport == cfg.ControllerPort && string(t.dst[:n]) == string(ctl) {
		return true
	}
	return t.dport == cfg.GrpcPort && string(t.src[:n]) == string(ctl) && env.deliveredLocally(t)
}

// deliveredLocally mirrors delivered_locally_v4 and _v6: a unicast
// destination that the routing table does not forward. Addresses are
// tested as bytes, as the C does; netip's predicates would treat
// IPv4-mapped IPv6 addresses as IPv4 ones.
func (env *Env) deliveredLocally(t *tuple) bool {
	if t.family == 4 {
		if t.dst[0]&0xF0 == 0xE0 { // 224.0.0.0/4
			return false
		}
		return env.Local != nil && env.Local(netip.AddrFrom4([4]byte(t.dst[:4])))
	}
	if t.dst[0] == 0xFF { // ff00::/8
		return false
	}
	return env.Local != nil && env.Local(netip.AddrFrom16(t.dst))
}

// ndpBypass mirrors ndp_bypass: neighbour discovery that was not routed
// (RFC 4861: hop limit 255, code 0) to a destination on the link it came
// from: link-local, link-scope multicast or the gateway's own.
func (env *Env) ndpBypass(typ, code uint8, ip *ipInfo) bool {
	if typ < ndpRouterSolicit || typ > ndpRedirect || code != 0 || ip.hopLimit != 255 {
		return false
	}
	dst := ip.t.dst
	switch {
	case dst[0] == 0xFE && dst[1]&0xC0 == 0x80: // fe80::/10
		return true
	case dst[0] == 0xFF && dst[1] == 0x02: // ff02::/16
		return true
	}
	return env.deliveredLocally(&ip.t)
}

// related reports whether q, the header an ICMP error quotes, is the
// reverse of a live session or a live flow. Nothing is refreshed.
func (env *Env) related(q *tuple) bool {
	r := q.reverse()
	switch q.kind {
	case l4Ports:
		for _, proto := range []uint8{r.proto, 0} {
			if v := env.session(&r, proto); v != nil && env.sessionLive(v, false) {
				return true
			}
		}
	case l4EchoRequest:
	default:
		return false
	}
	if env.Config.TrackFlows == 0 {
		return false
	}
	f := env.flow(&r)
	return f != nil && env.flowLive(f, r.proto, false)
}

// policy is the verdict of an inbound packet that parsed completely, for
// both families.
func (env *Env) policy(t, q *tuple) Reason {
	r := ReasonNoSession
	switch t.kind {
	case l4Ports:
		if env.controllerBypass(t) {
			return ReasonController
		}
		// The exact protocol first: a live exact session is one lookup.
		for _, proto := range []uint8{t.proto, 0} {
			if v := env.session(t, proto); v != nil {
				if env.sessionLive(v, true) {
					return ReasonSession
				}
				r = ReasonExpired
			}
		}
	case l4ICMPError:
		// An error goes to the source of the packet it quotes.
		if (t.dst == q.src || mutation == "related-any-dst") && env.related(q) {
			return ReasonICMPRelated
		}
	}
	if (t.kind == l4Ports || t.kind == l4EchoReply) && env.Config.TrackFlows != 0 {
		if f := env.flow(t); f != nil && env.flowLive(f, t.proto, true) {
			return ReasonReply
		}
	}
	if p := env.allowMatch(t); p != nil {
		env.allowHit(t.family, p)
		return ReasonAllowlist
	}
	if t.kind == l4ICMPOther {
		return ReasonUnsupportedL4
	}
	return r
}

// classify leaves in ip as much of the packet's tuple as parsed, which
// is what its event carries.
func (env *Env) classify(pkt []byte, ip *ipInfo) Reason {
	et, l3, ok := parseL2(pkt)
	if !ok {
		return ReasonMalformed
	}
	var r Reason
	switch et {
	case ethPIPv4:
		*ip, r = parseIPv4(pkt, l3)
	case ethPIPv6:
		*ip, r = parseIPv6(pkt, l3)
		if r == reasonNone && ip.frag != fragLater && ip.t.proto == protoICMPv6 {
			if ip.l4off+icmp6MinLen > len(pkt) || ip.l4off+icmp6MinLen > ip.l3end {
				return ReasonMalformed
			}
			if env.ndpBypass(pkt[ip.l4off], pkt[ip.l4off+1], ip) {
				return ReasonNDP
			}
		}
	case ethPARP:
		return ReasonARP
	default:
		return ReasonUnsupportedL3
	}
	if r != reasonNone {
		return r
	}
	return env.classifyIP(pkt, ip)
}

// classifyIP is the verdict shared by both families once the IP header
// parsed.
func (env *Env) classifyIP(pkt []byte, ip *ipInfo) Reason {
	if ip.frag == fragLater {
		return env.fragVerdict(ip)
	}
	if r := parseL4(pkt, ip); r != reasonNone {
		return r
	}
	var q tuple
	if ip.t.kind == l4ICMPError {
		var r Reason
		if q, r = parseQuote(pkt, ip.l4off+icmpHdrLen, ip.l3end, ip.t.family); r != reasonNone {
			return r
		}
	}
	r := env.policy(&ip.t, &q)
	if ip.frag == fragFirst && r.Pass() {
		k := ip.fragKey()
		env.Frags[k] = &AegisFragValue{ExpiresNs: env.Now + uint64(FragTimeout), Reason: uint32(r)}
		if env.onFragment != nil {
			env.onFragment(k)
		}
	}
	return r
}

func (env *Env) fragVerdict(ip *ipInfo) Reason {
	v := env.Frags[ip.fragKey()]
	if v == nil {
		return ReasonFragment
	}
	live := int64(env.Now-v.ExpiresNs) < 0
	if env.Late != 0 && (int64(env.Late-v.ExpiresNs) < 0) != live {
		env.Ambiguous = true
	}
	if live {
		return Reason(v.Reason)
	}
	return ReasonFragment
}

// parseL2 skips Ethernet and up to two VLAN tags.
func parseL2(pkt []byte) (etherType uint16, l3 int, ok bool) {
	if len(pkt) < ethHdrLen {
		return 0, 0, false
	}
	off := ethHdrLen
	et := binary.BigEndian.Uint16(pkt[ethTypeOff:])
	for i := 0; i < maxVLANTags && (et == ethP8021Q || et == ethP8021AD); i++ {
		if off+vlanHdrLen > len(pkt) {
			return 0, 0, false
		}
		et = binary.BigEndian.Uint16(pkt[off+vlanTypeOff:])
		off += vlanHdrLen
	}
	return et, off, true
}

func parseIPv4(pkt []byte, off int) (ipInfo, Reason) {
	var p ipInfo
	if off+ipv4MinHdrLen > len(pkt) || pkt[off]>>4 != 4 {
		return p, ReasonMalformed
	}
	ihl := int(pkt[off]&0xF) * 4
	tot := int(binary.BigEndian.Uint16(pkt[off+ipv4TotLenOff:]))
	if ihl < ipv4MinHdrLen || tot < ihl || off+tot > len(pkt) {
		return p, ReasonMalformed
	}
	p.t.family = 4
	p.t.proto = pkt[off+ipv4ProtoOff]
	copy(p.t.src[:4], pkt[off+ipv4SrcOff:])
	copy(p.t.dst[:4], pkt[off+ipv4DstOff:])
	p.l4off = off + ihl
	p.l3end = off + tot
	if frag := binary.BigEndian.Uint16(pkt[off+ipv4FragOff:]); frag&(ipv4OffsetMask|ipv4MF) != 0 {
		p.frag = fragFirst
		if frag&ipv4OffsetMask != 0 {
			p.frag = fragLater
		}
		p.fragID = uint32(binary.BigEndian.Uint16(pkt[off+ipv4IDOff:]))
		p.fragProto = p.t.proto
	}
	return p, reasonNone
}

func parseIPv6(pkt []byte, off int) (ipInfo, Reason) {
	var p ipInfo
	if off+ipv6HdrLen > len(pkt) || pkt[off]>>4 != 6 {
		return p, ReasonMalformed
	}
	p.l3end = off + ipv6HdrLen + int(binary.BigEndian.Uint16(pkt[off+ipv6PayloadLenOff:]))
	if p.l3end > len(pkt) {
		return p, ReasonMalformed
	}
	p.t.family = 6
	p.hopLimit = pkt[off+ipv6HopLimitOff]
	copy(p.t.src[:], pkt[off+ipv6SrcOff:])
	copy(p.t.dst[:], pkt[off+ipv6DstOff:])

	nh := pkt[off+ipv6NextOff]
	at := off + ipv6HdrLen
walk:
	for i := 0; i < MaxIPv6ExtHeaders; i++ {
		switch nh {
		case protoHopOpts, protoRouting, protoDstOpts, protoAH, protoFragment:
		default:
			break walk // the upper-layer header
		}
		if at+ipv6ExtMinLen > len(pkt) {
			return p, ReasonMalformed
		}
		var hlen int
		switch nh {
		case protoFragment:
			if fo := binary.BigEndian.Uint16(pkt[at+ipv6FragOffOff:]); fo&(ipv6OffsetMask|ipv6M) != 0 {
				p.fragID = binary.BigEndian.Uint32(pkt[at+ipv6FragIDOff:])
				p.fragProto = pkt[at]
				p.frag = fragFirst
				if fo&ipv6OffsetMask != 0 {
					p.frag = fragLater
					return p, reasonNone
				}
			}
			hlen = ipv6ExtMinLen
		case protoAH:
			hlen = (int(pkt[at+1]) + 2) * 4
		default:
			hlen = (int(pkt[at+1]) + 1) * 8
		}
		nh = pkt[at]
		at += hlen
	}
	// Still on an extension header after MaxIPv6ExtHeaders: parseL4 counts
	// it as unsupported.
	p.t.proto = nh
	p.l4off = at
	return p, reasonNone
}

// parseL4 reads the TCP, UDP or ICMP header at ip.l4off, which must end
// within both the frame and the IP datagram, into ip.t.
func parseL4(pkt []byte, ip *ipInfo) Reason {
	t, off := &ip.t, ip.l4off
	fits := func(n int) bool { return off+n <= len(pkt) && off+n <= ip.l3end }
	switch {
	case t.proto == protoTCP || t.proto == protoUDP:
		n := udpHdrLen
		if t.proto == protoTCP {
			n = tcpHdrLen
		}
		if !fits(n) {
			return ReasonMalformed
		}
		t.sport = binary.BigEndian.Uint16(pkt[off:])
		t.dport = binary.BigEndian.Uint16(pkt[off+2:])
		if t.proto == protoTCP {
			t.tcpFlags = pkt[off+tcpFlagsOff]
		}
		t.kind = l4Ports
		return reasonNone
	case t.family == 4 && t.proto == protoICMP, t.family == 6 && t.proto == protoICMPv6:
	default:
		return ReasonUnsupportedL4
	}
	if !fits(icmpHdrLen) {
		return ReasonMalformed
	}
	typ, id := pkt[off], binary.BigEndian.Uint16(pkt[off+icmpIDOff:])
	switch {
	case t.family == 4 && typ == icmpEcho, t.family == 6 && typ == icmp6EchoRequest:
		t.kind, t.sport = l4EchoRequest, id
	case t.family == 4 && typ == icmpEchoReply, t.family == 6 && typ == icmp6EchoReply:
		t.kind, t.dport = l4EchoReply, id
	case t.family == 4 && (typ == icmpDestUnreach || typ == icmpTimeExceeded || typ == icmpParamProblem),
		t.family == 6 && typ >= icmp6DestUnreach && typ <= icmp6ParamProblem:
		t.kind = l4ICMPError
	default:
		t.kind = l4ICMPOther
	}
	return reasonNone
}

// parseQuote reads the IP header and the first 8 bytes after it that an
// ICMP error quotes, starting at off and ending within the outer datagram
// (l3end). An inner header that cannot be matched gets kind l4ICMPOther.
func parseQuote(pkt []byte, off, l3end int, family uint8) (tuple, Reason) {
	q := tuple{family: family, kind: l4ICMPOther}
	fits := func(at, n int) bool { return at+n <= len(pkt) && at+n <= l3end }
	var l4 int
	var proto uint8
	if family == 4 {
		if !fits(off, ipv4MinHdrLen) {
			return q, ReasonMalformed
		}
		ihl := int(pkt[off]&0xF) * 4
		if pkt[off]>>4 != 4 || ihl < ipv4MinHdrLen {
			return q, ReasonMalformed
		}
		l4 = off + ihl
		proto = pkt[off+ipv4ProtoOff]
		if binary.BigEndian.Uint16(pkt[off+ipv4FragOff:])&ipv4OffsetMask != 0 {
			proto = quoteUnmatchableL4
		}
		copy(q.src[:4], pkt[off+ipv4SrcOff:])
		copy(q.dst[:4], pkt[off+ipv4DstOff:])
	} else {
		if !fits(off, ipv6HdrLen) || pkt[off]>>4 != 6 {
			return q, ReasonMalformed
		}
		l4 = off + ipv6HdrLen
		proto = pkt[off+ipv6NextOff]
		copy(q.src[:], pkt[off+ipv6SrcOff:])
		copy(q.dst[:], pkt[off+ipv6DstOff:])
	}
	if !fits(l4, icmpHdrLen) {
		return q, ReasonMalformed
	}
	q.proto = proto
	switch {
	case proto == protoTCP || proto == protoUDP:
		q.sport = binary.BigEndian.Uint16(pkt[l4:])
		q.dport = binary.BigEndian.Uint16(pkt[l4+2:])
		q.kind = l4Ports
	case family == 4 && proto == protoICMP && pkt[l4] == icmpEcho,
		family == 6 && proto == protoICMPv6 && pkt[l4] == icmp6EchoRequest:
		q.sport = binary.BigEndian.Uint16(pkt[l4+icmpIDOff:])
		q.kind = l4EchoRequest
	}
	return q, reasonNone
}
