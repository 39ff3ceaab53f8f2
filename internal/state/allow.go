package state

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/aegis-agent/aegis/bpf"
)

// AllowRule is a static allow rule (see bpf.AllowRule).
type AllowRule = bpf.AllowRule

// ParseAllowRule parses the loader's --allow syntax:
//
//	CIDR[,PROTO[/PORT]]
//
// CIDR is a prefix or a single address (198.51.100.0/24, 2001:db8::7);
// PROTO is tcp, udp, any or icmp; PORT is a destination port. Omitted parts
// match anything: "198.51.100.0/24" lets that network reach everything,
// "198.51.100.0/24,tcp/22" only TCP port 22, "any/53" TCP and UDP port 53.
// icmp (ICMPv6 for an IPv6 prefix) admits every ICMP message from the
// prefix, echo requests included; ICMP has no port, so icmp takes none.
func ParseAllowRule(s string) (AllowRule, error) {
	var r AllowRule
	cidr, rest, hasRest := strings.Cut(strings.TrimSpace(s), ",")
	if strings.Contains(cidr, "/") {
		p, err := netip.ParsePrefix(cidr)
		if err != nil {
			return r, fmt.Errorf("allow rule %q: %w: bad prefix: %v", s, ErrInvalid, err)
		}
		r.Prefix = p
	} else {
		a, err := netip.ParseAddr(cidr)
		if err != nil {
			return r, fmt.Errorf("allow rule %q: %w: bad address: %v", s, ErrInvalid, err)
		}
		if a.Zone() != "" {
			return r, fmt.Errorf("allow rule %q: %w: use a plain IPv4 or IPv6 prefix", s, ErrInvalid)
		}
		r.Prefix = netip.PrefixFrom(a, a.BitLen())
	}
	if r.Prefix.Addr().Zone() != "" || r.Prefix.Addr().Is4In6() {
		return r, fmt.Errorf("allow rule %q: %w: use a plain IPv4 or IPv6 prefix", s, ErrInvalid)
	}
	r.Prefix = r.Prefix.Masked()
	if !hasRest {
		return r, nil
	}
	proto, port, hasPort := strings.Cut(rest, "/")
	switch strings.ToLower(proto) {
	case "tcp":
		r.Proto = uint8(TCP)
	case "udp":
		r.Proto = uint8(UDP)
	case "any":
	case "icmp":
		r.Proto = uint8(ICMP)
		if r.Prefix.Addr().Is6() {
			r.Proto = uint8(ICMPv6)
		}
		if hasPort {
			return r, fmt.Errorf("allow rule %q: %w: icmp has no port: write %s,icmp", s, ErrInvalid, r.Prefix)
		}
	default:
		return r, fmt.Errorf("allow rule %q: %w: protocol %q: want tcp, udp, any or icmp", s, ErrInvalid, proto)
	}
	if hasPort {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return r, fmt.Errorf("allow rule %q: %w: port %q: want 1-65535", s, ErrInvalid, port)
		}
		r.Port = uint16(n)
	}
	return r, nil
}

// FormatAllowRule is the inverse of ParseAllowRule.
func FormatAllowRule(r AllowRule) string {
	if r.Proto == 0 && r.Port == 0 {
		return r.Prefix.String()
	}
	proto := Protocol(r.Proto).String()
	if Protocol(r.Proto) == ICMPv6 {
		proto = "icmp" // the family's ICMP, as ParseAllowRule reads it
	}
	if r.Port == 0 {
		return r.Prefix.String() + "," + proto
	}
	return fmt.Sprintf("%s,%s/%d", r.Prefix, proto, r.Port)
}

// AllowEntries is the content of allow_v4 and allow_v6 for a rule set.
type AllowEntries struct {
	V4 map[bpf.AegisAllowKeyV4]bpf.AegisAllowValue
	V6 map[bpf.AegisAllowKeyV6]bpf.AegisAllowValue
	// IDs numbers the rules the entries hold (ReadAllow's rules) within
	// their family: the id each of their pairs carries, their hit counter
	// (allowhits.go). 0 for a rule past the family's MaxAllowRuleID-th.
	IDs map[AllowRule]uint8
}

// MaxAllowPorts is the number of (protocol, port) pairs an allow-list
// prefix's value holds, from the value's layout in the object.
const MaxAllowPorts = len(bpf.AegisAllowValue{}.Ports)

// CompileAllow turns rules into LPM-trie entries. The data path makes one
// longest-prefix lookup per packet, so each prefix's value carries its own
// (protocol, port) pairs and those of every shorter prefix that covers it.
// The rules are numbered afresh (see CompileAllowKeeping).
// Returns an error wrapping ErrInvalid if a prefix would need more than
// MaxAllowPorts pairs.
func CompileAllow(rules []AllowRule) (AllowEntries, error) {
	return CompileAllowKeeping(rules, nil)
}

// CompileAllowKeeping is CompileAllow keeping the ids that prev (the
// pinned rules' ReadAllowIDs) gives the rules it still has, so that their
// hit counts go on across a load that changes other rules.
//
// Each pair a prefix holds is the pair of the rule it is attributed to:
// of the rules with that exact pair covering the prefix, the one of the
// shortest prefix, the rule ReadAllow reads back. A rule whose pairs a
// broader pair covers everywhere (tcp/22 under an any-protocol rule of a
// covering prefix) holds no pair: it admits nothing the other does not,
// counts nothing, and ReadAllow does not show it.
func CompileAllowKeeping(rules []AllowRule, prev map[AllowRule]uint8) (AllowEntries, error) {
	out := AllowEntries{
		V4:  make(map[bpf.AegisAllowKeyV4]bpf.AegisAllowValue),
		V6:  make(map[bpf.AegisAllowKeyV6]bpf.AegisAllowValue),
		IDs: make(map[AllowRule]uint8),
	}
	prefixes := make(map[netip.Prefix]bool)
	for _, r := range rules {
		prefixes[r.Prefix.Masked()] = true
	}
	owners := make(map[netip.Prefix][]AllowRule, len(prefixes))
	for p := range prefixes {
		var ports []bpf.AegisAllowPort
		for _, r := range rules {
			q := r.Prefix.Masked()
			if q.Addr().Is4() != p.Addr().Is4() || q.Bits() > p.Bits() || !q.Contains(p.Addr()) {
				continue
			}
			ports = append(ports, bpf.AegisAllowPort{Proto: r.Proto, Port: r.Port})
		}
		ports = simplifyPorts(ports)
		if len(ports) > MaxAllowPorts {
			return out, fmt.Errorf("%w: %d protocol/port pairs apply to %s, at most %d fit: merge rules or widen them",
				ErrInvalid, len(ports), p, MaxAllowPorts)
		}
		for _, port := range ports {
			owner := AllowRule{Prefix: p, Proto: port.Proto, Port: port.Port}
			for _, r := range rules {
				q := r.Prefix.Masked()
				if r.Proto == port.Proto && r.Port == port.Port && q.Addr().Is4() == p.Addr().Is4() &&
					q.Bits() < owner.Prefix.Bits() && q.Contains(p.Addr()) {
					owner.Prefix = q
				}
			}
			owners[p] = append(owners[p], owner)
			out.IDs[owner] = 0
		}
	}
	numberRules(out.IDs, prev)
	for p, own := range owners {
		var v bpf.AegisAllowValue
		v.Count = uint32(len(own))
		for i, r := range own {
			v.Ports[i] = bpf.AegisAllowPort{Proto: r.Proto, Rule: out.IDs[r], Port: r.Port}
		}
		if p.Addr().Is4() {
			out.V4[bpf.AegisAllowKeyV4{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()}] = v
		} else {
			out.V6[bpf.AegisAllowKeyV6{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()}] = v
		}
	}
	return out, nil
}

// simplifyPorts sorts and deduplicates pairs and drops those another pair
// already covers (tcp/22 under tcp/any, anything under any/any).
func simplifyPorts(ports []bpf.AegisAllowPort) []bpf.AegisAllowPort {
	covers := func(a, b bpf.AegisAllowPort) bool {
		return (a.Proto == 0 || a.Proto == b.Proto) && (a.Port == 0 || a.Port == b.Port)
	}
	slices.SortFunc(ports, func(a, b bpf.AegisAllowPort) int {
		return cmp.Or(cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Port, b.Port))
	})
	ports = slices.Compact(ports)
	var out []bpf.AegisAllowPort
	for i, p := range ports {
		covered := false
		for j, q := range ports {
			if i != j && q != p && covers(q, p) {
				covered = true
				break
			}
		}
		if !covered {
			out = append(out, p)
		}
	}
	return out
}

// ReadAllow decodes allow_v4 and allow_v6 back into rules, dropping the
// pairs a prefix only inherits from a covering prefix, so the result reads
// like the rules the loader was given.
func ReadAllow(m *Maps) ([]AllowRule, error) {
	var all []allowPair
	if err := eachAllowPair(m, func(p allowPair) { all = append(all, p) }); err != nil {
		return nil, err
	}
	var out []AllowRule
	for _, p := range ownPairs(all) {
		out = append(out, p.rule)
	}
	sortRules(out)
	return out, nil
}
