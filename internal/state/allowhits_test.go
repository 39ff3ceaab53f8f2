package state_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

func rules(t *testing.T, ss ...string) []state.AllowRule { return tu.AllowRules(t, ss...) }

// Every pair a prefix holds carries the id of the rule it is attributed
// to: of the rules with that pair covering the prefix, the shortest one's.
// Rules a broader pair covers everywhere hold no pair and get no id.
func TestCompileAllowAttributesPairs(t *testing.T) {
	rs := rules(t, "192.0.2.0/24,tcp/22", "192.0.2.0/28,tcp/22", "192.0.2.0/28,udp", "192.0.2.8/29",
		"192.0.2.8/29,tcp/443", "2001:db8::/64,tcp/22", "2001:db8::/96,tcp/22")
	e, err := state.CompileAllow(rs)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[[2]uint8]state.AllowRule{}
	for r, id := range e.IDs {
		fam := uint8(4)
		if r.Prefix.Addr().Is6() {
			fam = 6
		}
		if id == 0 || byID[[2]uint8{fam, id}] != (state.AllowRule{}) {
			t.Fatalf("rule %v: id %d missing or taken twice", r, id)
		}
		byID[[2]uint8{fam, id}] = r
	}
	var got []string
	for r := range e.IDs {
		got = append(got, state.FormatAllowRule(r))
	}
	slices.Sort(got)
	// The /28's tcp/22 and the /96's are the /24's and /64's pair; the
	// /29's tcp/443 is covered by the /29's any rule.
	want := []string{"192.0.2.0/24,tcp/22", "192.0.2.0/28,udp", "192.0.2.8/29", "2001:db8::/64,tcp/22"}
	if !slices.Equal(got, want) {
		t.Fatalf("numbered rules %v, want %v", got, want)
	}
	check := func(p netip.Prefix, v bpf.AegisAllowValue, fam uint8) {
		for _, port := range v.Ports[:v.Count] {
			r := byID[[2]uint8{fam, port.Rule}]
			if r.Proto != port.Proto || r.Port != port.Port || !r.Prefix.Contains(p.Addr()) || r.Prefix.Bits() > p.Bits() {
				t.Fatalf("prefix %v pair %+v attributed to %v", p, port, r)
			}
		}
	}
	for k, v := range e.V4 {
		check(netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen)), v, 4)
	}
	for k, v := range e.V6 {
		check(netip.PrefixFrom(netip.AddrFrom16(k.Addr), int(k.Prefixlen)), v, 6)
	}
}

// A load keeps the ids of the rules it keeps, gives new rules ids no
// previous rule held while there are any, and says which counters start
// from zero, before or after the write.
func TestCompileAllowKeepsIDs(t *testing.T) {
	first, err := state.CompileAllow(rules(t, "192.0.2.0/24,tcp/22", "198.51.100.0/24,udp/53", "203.0.113.0/24", "2001:db8::/64"))
	if err != nil {
		t.Fatal(err)
	}
	next, err := state.CompileAllowKeeping(rules(t, "203.0.113.0/24", "2001:db8::/64", "192.0.2.0/25,tcp/443", "2001:db8:1::/64"), first.IDs)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"203.0.113.0/24", "2001:db8::/64"} {
		r := rules(t, s)[0]
		if next.IDs[r] != first.IDs[r] {
			t.Fatalf("%s: id %d, was %d", s, next.IDs[r], first.IDs[r])
		}
	}
	held := map[uint8]bool{}
	for r, id := range first.IDs {
		if r.Prefix.Addr().Is4() {
			held[id] = true
		}
	}
	added := rules(t, "192.0.2.0/25,tcp/443")[0]
	if id := next.IDs[added]; id == 0 || held[id] {
		t.Fatalf("new rule took id %d, held before: %v", id, held)
	}
	before, after := next.FreshHitSlots(first.IDs)
	want := []uint32{bpf.AllowHitSlot(4, next.IDs[added]), bpf.AllowHitSlot(6, next.IDs[rules(t, "2001:db8:1::/64")[0]])}
	slices.Sort(want)
	if !slices.Equal(before, want) || len(after) != 0 {
		t.Fatalf("fresh slots before %v after %v, want %v before", before, after, want)
	}

	// With every id taken, a new rule takes over a removed rule's id and
	// its counter is cleared after the write.
	var many []string
	for i := range state.MaxAllowRuleID {
		many = append(many, fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
	}
	full, err := state.CompileAllow(rules(t, many...))
	if err != nil {
		t.Fatal(err)
	}
	swapped := append(slices.Clone(many[1:]), "172.16.0.0/12")
	re, err := state.CompileAllowKeeping(rules(t, swapped...), full.IDs)
	if err != nil {
		t.Fatal(err)
	}
	gone := full.IDs[rules(t, many[0])[0]]
	if id := re.IDs[rules(t, "172.16.0.0/12")[0]]; id != gone {
		t.Fatalf("new rule took id %d, want the removed rule's %d", id, gone)
	}
	if before, after := re.FreshHitSlots(full.IDs); len(before) != 0 || !slices.Equal(after, []uint32{uint32(gone)}) {
		t.Fatalf("fresh slots before %v after %v", before, after)
	}
	// One rule too many has no counter of its own.
	over, err := state.CompileAllow(rules(t, append(many, "172.16.0.0/12")...))
	if err != nil {
		t.Fatal(err)
	}
	zero := 0
	for _, id := range over.IDs {
		if id == 0 {
			zero++
		}
	}
	if zero != 1 {
		t.Fatalf("%d rules without an id, want 1", zero)
	}
}
