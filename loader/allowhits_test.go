package loader_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"testing"
	"time"

	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// Real packets through the loaded program count against the allow rule
// that admitted them, status shows the counts (text and JSON), and a load
// that changes the rule set keeps the counts of the rules it keeps and
// starts new rules from zero.
func TestAllowHitsPerRuleAcrossReload(t *testing.T) {
	e := newEnv(t)
	e.mustLoad(nil, "--allow", "203.0.113.0/24,tcp/22", "--allow", "198.51.100.0/24,tcp", "--allow", "192.0.2.0/24,udp/53")
	a0 := e.ns.OpenLink(t, "a0")
	a1 := e.ns.OpenLink(t, "a1")
	send := func(n int, src string, dport uint16) {
		for range n {
			a1.Send(t, a0.MAC, tu.TCPPacket(netip.AddrPortFrom(netip.MustParseAddr(src), 40000),
				netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), dport), tu.TCPSyn, 64))
		}
	}
	hits := func() string {
		out := map[string]string{}
		for _, h := range e.statusJSON(nil).AllowHits {
			out[h.Rule] = fmt.Sprint(h.Packets)
		}
		return fmt.Sprint(out)
	}
	expect := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for got := hits(); got != want; got = hits() {
			if time.Now().After(deadline) {
				t.Fatalf("allow hits %s, want %s", got, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	send(3, "203.0.113.9", 22)
	send(2, "198.51.100.9", 443)
	send(2, "203.0.113.9", 23) // no rule admits it
	expect("map[192.0.2.0/24,udp/53:0 198.51.100.0/24,tcp:2 203.0.113.0/24,tcp/22:3]")
	out := e.cli(nil, "status", "--pin-path", e.pin).stdout
	if !regexp.MustCompile(`(?m)^ALLOW RULE\s+ID\s+HITS$`).MatchString(out) || !regexp.MustCompile(`(?m)^203\.0\.113\.0/24,tcp/22\s+\d+\s+3$`).MatchString(out) {
		t.Fatalf("status does not show the hits:\n%s", out)
	}

	// 10.0.0.0/8 sorts first: numbered afresh, every other rule's id
	// would move.
	e.mustLoad(nil, "--allow", "10.0.0.0/8,tcp/22", "--allow", "203.0.113.0/24,tcp/22", "--allow", "192.0.2.0/24,udp/53",
		"--allow", "198.51.100.128/25,tcp/443")
	expect("map[10.0.0.0/8,tcp/22:0 192.0.2.0/24,udp/53:0 198.51.100.128/25,tcp/443:0 203.0.113.0/24,tcp/22:3]")
	send(1, "203.0.113.9", 22)
	send(1, "198.51.100.9", 443) // its rule is gone
	send(2, "198.51.100.200", 443)
	expect("map[10.0.0.0/8,tcp/22:0 192.0.2.0/24,udp/53:0 198.51.100.128/25,tcp/443:2 203.0.113.0/24,tcp/22:4]")
	if st := e.statusJSON(nil); st.AllowUnnumbered != 0 {
		t.Fatalf("%d packets counted without a rule", st.AllowUnnumbered)
	}
}
