package state

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// Allow rule hit counters.
//
// Every (protocol, port) pair in the allow maps carries the id of the rule
// it is attributed to (CompileAllowKeeping), and the data path counts each
// packet an allow rule admits in allow_hits at the slot of that id: one
// per-CPU increment after the lookup the verdict already made. Ids are per
// address family, 1 to MaxAllowRuleID; a family's slot 0 counts the pairs
// that carry no id (rules past the limit, or pairs a loader of an older
// release wrote). The slot of a rule is AllowHitSlot.
//
// A rule keeps its id, and so its count, across loads that leave it in the
// rule set, and across upgrades of the program. A rule the load adds takes
// an id no rule of the previous set held if one is free, and its counter
// starts from zero; the ids of removed rules are free again, their counts
// gone. Counting is per CPU and never reset otherwise, as the verdict
// counters are.

// MaxAllowRuleID is the largest rule id: the ids of a family's rules fit
// the byte struct allow_port has for them.
const MaxAllowRuleID = int(bpf.AegisLimitsLIMIT_ALLOW_RULE_IDS) - 1

// AllowHitSlot returns the allow_hits slot that counts the rule of the
// family (4 or 6) with the id.
func AllowHitSlot(family uint8, id uint8) uint32 { return bpf.AllowHitSlot(family, id) }

func familyOf(p netip.Prefix) uint8 {
	if p.Addr().Is4() {
		return 4
	}
	return 6
}

// numberRules gives each rule of ids an id within its family: the one prev
// gives it if no other rule took it, else the lowest id that no rule of
// prev held (so that a counter a packet may still be adding to for a
// removed rule is not handed over), else the lowest id free at all, else
// 0 (not counted on its own).
func numberRules(ids map[AllowRule]uint8, prev map[AllowRule]uint8) {
	rules := make([]AllowRule, 0, len(ids))
	for r := range ids {
		rules = append(rules, r)
	}
	sortRules(rules)
	for _, fam := range []uint8{4, 6} {
		used := map[uint8]bool{}
		held := map[uint8]bool{}
		for r, id := range prev {
			if familyOf(r.Prefix) == fam && id != 0 {
				held[id] = true
			}
		}
		var rest []AllowRule
		for _, r := range rules {
			if familyOf(r.Prefix) != fam {
				continue
			}
			if id := prev[r]; id != 0 && !used[id] {
				ids[r], used[id] = id, true
				continue
			}
			rest = append(rest, r)
		}
		next := func(avoid map[uint8]bool) uint8 {
			for id := 1; id <= MaxAllowRuleID; id++ {
				if !used[uint8(id)] && !avoid[uint8(id)] {
					return uint8(id)
				}
			}
			return 0
		}
		for _, r := range rest {
			id := next(held)
			if id == 0 {
				id = next(nil)
			}
			ids[r] = id
			if id != 0 {
				used[id] = true
			}
		}
	}
}

func sortRules(rules []AllowRule) {
	slices.SortFunc(rules, func(a, b AllowRule) int {
		return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()),
			cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Port, b.Port))
	})
}

// FreshHitSlots returns the allow_hits slots of the rules of e whose id is
// not the one prev gives them: their counters must start from zero.
// before are the slots no rule of prev held, which nothing counts in
// until e is written, so they are cleared before; after are the slots e
// takes over from a removed rule of prev, cleared once e replaced prev.
func (e AllowEntries) FreshHitSlots(prev map[AllowRule]uint8) (before, after []uint32) {
	held := map[uint32]bool{}
	for r, id := range prev {
		if id != 0 {
			held[AllowHitSlot(familyOf(r.Prefix), id)] = true
		}
	}
	for r, id := range e.IDs {
		if id == 0 || prev[r] == id {
			continue
		}
		slot := AllowHitSlot(familyOf(r.Prefix), id)
		if held[slot] {
			after = append(after, slot)
		} else {
			before = append(before, slot)
		}
	}
	slices.Sort(before)
	slices.Sort(after)
	return before, after
}

// ZeroAllowHits clears the counters of the slots on every CPU.
func ZeroAllowHits(m *ebpf.Map, slots []uint32) error {
	if len(slots) == 0 {
		return nil
	}
	zero := make([]uint64, ebpf.MustPossibleCPU())
	for _, s := range slots {
		if err := m.Put(s, zero); err != nil {
			return fmt.Errorf("clear allow rule counter %d: %w", s, err)
		}
	}
	return nil
}

// ReadAllowIDs returns the ids the pinned allow maps give their rules
// (ReadAllow's), 0 for a rule whose pairs carry none.
func ReadAllowIDs(m *Maps) (map[AllowRule]uint8, error) {
	var pairs []allowPair
	if err := eachAllowPair(m, func(p allowPair) { pairs = append(pairs, p) }); err != nil {
		return nil, err
	}
	out := map[AllowRule]uint8{}
	for _, p := range ownPairs(pairs) {
		out[p.rule] = p.id
	}
	return out, nil
}

// RuleHits is one allow rule's count.
type RuleHits struct {
	Rule AllowRule
	// ID is the rule's id within its family; 0: the rule has no counter of
	// its own and its packets count in Unnumbered.
	ID      uint8
	Packets uint64
}

// AllowHits is what the allow rules admitted.
type AllowHits struct {
	// Rules are the pinned rules, in ReadAllow's order.
	Rules []RuleHits
	// Unnumbered counts, per family (IPv4 first), the packets of pairs
	// without an id.
	Unnumbered [2]uint64
}

// ReadAllowHits reads the pinned rules with their counts, summed over
// CPUs.
func ReadAllowHits(m *Maps) (AllowHits, error) {
	var out AllowHits
	ids, err := ReadAllowIDs(m)
	if err != nil {
		return out, err
	}
	read := func(slot uint32) (uint64, error) {
		var perCPU []uint64
		if err := m.AllowHits.Lookup(slot, &perCPU); err != nil {
			return 0, fmt.Errorf("read allow rule counter %d: %w", slot, err)
		}
		var n uint64
		for _, c := range perCPU {
			n += c
		}
		return n, nil
	}
	for r, id := range ids {
		h := RuleHits{Rule: r, ID: id}
		if id != 0 {
			if h.Packets, err = read(AllowHitSlot(familyOf(r.Prefix), id)); err != nil {
				return out, err
			}
		}
		out.Rules = append(out.Rules, h)
	}
	slices.SortFunc(out.Rules, func(a, b RuleHits) int {
		return cmp.Or(a.Rule.Prefix.Addr().Compare(b.Rule.Prefix.Addr()), cmp.Compare(a.Rule.Prefix.Bits(), b.Rule.Prefix.Bits()),
			cmp.Compare(a.Rule.Proto, b.Rule.Proto), cmp.Compare(a.Rule.Port, b.Rule.Port))
	})
	for i, fam := range []uint8{4, 6} {
		if out.Unnumbered[i], err = read(AllowHitSlot(fam, 0)); err != nil {
			return out, err
		}
	}
	return out, nil
}

// allowPair is one pair of one prefix in the allow maps.
type allowPair struct {
	rule AllowRule // the prefix's own prefix, with the pair
	id   uint8
}

func eachAllowPair(m *Maps, fn func(allowPair)) error {
	var k4 bpf.AegisAllowKeyV4
	var k6 bpf.AegisAllowKeyV6
	var v bpf.AegisAllowValue
	add := func(p netip.Prefix, v *bpf.AegisAllowValue) {
		for _, port := range v.Ports[:min(int(v.Count), len(v.Ports))] {
			fn(allowPair{rule: AllowRule{Prefix: p, Proto: port.Proto, Port: port.Port}, id: port.Rule})
		}
	}
	it := m.AllowV4.Iterate()
	for it.Next(&k4, &v) {
		add(netip.PrefixFrom(netip.AddrFrom4(k4.Addr), int(k4.Prefixlen)), &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read allow_v4: %w", err)
	}
	it = m.AllowV6.Iterate()
	for it.Next(&k6, &v) {
		add(netip.PrefixFrom(netip.AddrFrom16(k6.Addr), int(k6.Prefixlen)), &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read allow_v6: %w", err)
	}
	return nil
}

// ownPairs drops the pairs a prefix only inherits from a covering prefix,
// leaving one per rule: what the loader was given.
func ownPairs(all []allowPair) []allowPair {
	var out []allowPair
	for _, p := range all {
		r := p.rule
		inherited := false
		for _, q := range all {
			qr := q.rule
			if qr.Prefix.Bits() < r.Prefix.Bits() && qr.Prefix.Addr().Is4() == r.Prefix.Addr().Is4() &&
				qr.Prefix.Contains(r.Prefix.Addr()) && qr.Proto == r.Proto && qr.Port == r.Port {
				inherited = true
				break
			}
		}
		if !inherited {
			out = append(out, p)
		}
	}
	return out
}
