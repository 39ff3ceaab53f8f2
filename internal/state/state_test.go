package state_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

func TestParseAllowRule(t *testing.T) {
	for _, c := range []struct {
		in, out string
		err     bool
	}{
		{"198.51.100.0/24", "198.51.100.0/24", false},
		{"198.51.100.7/24,tcp/22", "198.51.100.0/24,tcp/22", false}, // masked
		{"203.0.113.9", "203.0.113.9/32", false},
		{"2001:db8::/32,udp", "2001:db8::/32,udp", false},
		{"2001:db8::1,any/53", "2001:db8::1/128,any/53", false},
		{" 198.51.100.0/24,TCP/22 ", "198.51.100.0/24,tcp/22", false},
		{"198.51.100.0/33", "", true},
		{"198.51.100.0/24,icmp", "198.51.100.0/24,icmp", false},
		{"2001:db8::/32,ICMP", "2001:db8::/32,icmp", false},
		{"198.51.100.0/24,icmp/8", "", true},
		{"198.51.100.0/24,gre", "", true},
		{"198.51.100.0/24,tcp/0", "", true},
		{"198.51.100.0/24,tcp/65536", "", true},
		{"::ffff:192.0.2.1/128", "", true},
		{"fe80::1%eth0", "", true},
		{"", "", true},
	} {
		r, err := state.ParseAllowRule(c.in)
		if c.err {
			if !errors.Is(err, state.ErrInvalid) {
				t.Errorf("%q: err %v, want ErrInvalid", c.in, err)
			}
			continue
		}
		if err != nil || state.FormatAllowRule(r) != c.out {
			t.Errorf("%q: %q %v, want %q", c.in, state.FormatAllowRule(r), err, c.out)
		}
	}
}

// CompileAllow folds covering prefixes' rules into each prefix, so that one
// longest-prefix lookup answers for every rule: checked against the model's
// plain reading of the rules for every address of a small space.
func TestCompileAllowMatchesRules(t *testing.T) {
	rules := tu.AllowRules(t, "192.0.2.0/24,tcp/22", "192.0.2.0/28,udp", "192.0.2.8/29,any/53", "192.0.2.12/32", "192.0.2.128/25,tcp/443")
	e, err := state.CompileAllow(rules)
	if err != nil {
		t.Fatal(err)
	}
	lookup := func(a netip.Addr) *bpf.AegisAllowValue { // longest prefix match
		for bits := 32; bits >= 0; bits-- {
			p, _ := a.Prefix(bits)
			if v, ok := e.V4[bpf.AegisAllowKeyV4{Prefixlen: uint32(bits), Addr: p.Addr().As4()}]; ok {
				return &v
			}
		}
		return nil
	}
	for i := 0; i < 256; i++ {
		a := netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})
		v := lookup(a)
		for _, proto := range []uint8{6, 17} {
			for _, port := range []uint16{22, 53, 443, 8080} {
				want := false
				for _, r := range rules {
					want = want || r.Matches(a, proto, port)
				}
				got := false
				if v != nil {
					for _, p := range v.Ports[:v.Count] {
						got = got || ((p.Proto == 0 || p.Proto == proto) && (p.Port == 0 || p.Port == port))
					}
				}
				if got != want {
					t.Fatalf("%v proto %d port %d: compiled %v, rules %v", a, proto, port, got, want)
				}
			}
		}
	}
}

func TestCompileAllowRefusesTooManyPairs(t *testing.T) {
	var rules []state.AllowRule
	for port := 1; port <= state.MaxAllowPorts+1; port++ {
		rules = append(rules, state.AllowRule{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Proto: 6, Port: uint16(port)})
	}
	if _, err := state.CompileAllow(rules); !errors.Is(err, state.ErrInvalid) {
		t.Fatalf("err %v, want ErrInvalid", err)
	}
}

func TestValidate(t *testing.T) {
	v4, v6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	ok := state.Session{Key: state.Key{Src: v4, Dst: v4, Port: 1, Proto: state.TCP}, User: "u"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	anyProto := ok
	anyProto.Proto = state.Any
	if err := anyProto.Validate(); err != nil {
		t.Fatalf("any-protocol session: %v", err)
	}
	for name, mod := range map[string]func(*state.Session){
		"mixed families": func(s *state.Session) { s.Dst = v6 },
		"mapped":         func(s *state.Session) { s.Src = netip.MustParseAddr("::ffff:192.0.2.1") },
		"unspecified":    func(s *state.Session) { s.Src = netip.IPv4Unspecified() },
		"zero port":      func(s *state.Session) { s.Port = 0 },
		"icmp":           func(s *state.Session) { s.Proto = 1 },
		"no user":        func(s *state.Session) { s.User = "" },
		"long user":      func(s *state.Session) { s.User = "0123456789012345678901234567890x" },
		"nul in user":    func(s *state.Session) { s.User = "a\x00b" },
		"negative idle":  func(s *state.Session) { s.IdleTimeout = -time.Second },
	} {
		s := ok
		mod(&s)
		if err := s.Validate(); !errors.Is(err, state.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

func TestGrantSemantics(t *testing.T) {
	dir := tu.PinDir(t)
	pinMaps(t, dir)
	m, err := state.Open(dir, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	k := state.Key{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("198.51.100.1"), Port: 443, Proto: state.TCP}
	if err := m.Grant(state.Session{Key: k, User: "alice", Created: 100, LastSeen: 100}); err != nil {
		t.Fatal(err)
	}
	// A re-grant refreshes everything but the creation time.
	if err := m.Grant(state.Session{Key: k, User: "alice", Created: 200, LastSeen: 200, IdleTimeout: time.Hour, Expires: 999}); err != nil {
		t.Fatal(err)
	}
	s, err := m.Lookup(k)
	if err != nil {
		t.Fatal(err)
	}
	if s.Created != 100 || s.LastSeen != 200 || s.IdleTimeout != time.Hour || s.Expires != 999 {
		t.Fatalf("after re-grant: %+v", s)
	}
	if n, _, _ := m.Count(); n != 1 {
		t.Fatalf("%d sessions after a re-grant, want 1", n)
	}
	// A grant to another user is that user's new session.
	if err := m.Grant(state.Session{Key: k, User: "bob", Created: 300, LastSeen: 300}); err != nil {
		t.Fatal(err)
	}
	if s, err := m.Lookup(k); err != nil || s.User != "bob" || s.Created != 300 {
		t.Fatalf("after a grant to another user: %+v %v", s, err)
	}
	if err := m.Grant(state.Session{Key: state.Key{Src: k.Src, Dst: k.Dst, Port: 0, Proto: state.TCP}, User: "x"}); !errors.Is(err, state.ErrInvalid) {
		t.Fatalf("bad grant: %v", err)
	}
	if err := m.Revoke(k); err != nil {
		t.Fatal(err)
	}
	if err := m.Revoke(k); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("second revoke: %v", err)
	}
}

func TestFullMapRefusesNewGrantsOnly(t *testing.T) {
	dir := tu.PinDir(t)
	pinMaps(t, dir)
	m, err := state.Open(dir, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	capacity := int(m.SessionsV4.MaxEntries())
	keys := make([]bpf.AegisSessionKeyV4, capacity)
	vals := make([]bpf.AegisSessionValue, capacity)
	for i := range keys {
		keys[i] = bpf.AegisSessionKeyV4{Src: [4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}, Dst: [4]byte{198, 51, 100, 1}, Dport: 443, Proto: 6}
		vals[i].LastSeenNs = 1
	}
	if _, err := m.SessionsV4.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatal(err)
	}
	newKey := state.Key{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("198.51.100.1"), Port: 443, Proto: state.TCP}
	if err := m.Grant(state.Session{Key: newKey, User: "late"}); !errors.Is(err, state.ErrFull) {
		t.Fatalf("grant into a full map: %v, want ErrFull", err)
	}
	// Refreshing an existing session still works on a full map.
	old := state.Key{Src: netip.AddrFrom4(keys[7].Src), Dst: netip.AddrFrom4(keys[7].Dst), Port: 443, Proto: state.TCP}
	if err := m.Grant(state.Session{Key: old, User: "again", LastSeen: 5}); err != nil {
		t.Fatalf("re-grant on a full map: %v", err)
	}
	if n, _, _ := m.Count(); n != capacity {
		t.Fatalf("%d sessions, want %d", n, capacity)
	}
}
