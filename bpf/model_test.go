package bpf_test

import (
	"encoding/hex"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// TestModelMatchesProgram runs generated frames (valid, truncated, mutated
// and random; VLAN-tagged; IPv4 with options, IPv6 with extension headers;
// fragments; bypass candidates to local, routed, unrouted, dropping,
// link-local and multicast destinations) through the real program with
// BPF_PROG_TEST_RUN and through the Go model, under three configurations,
// and requires the same action and the same counted reason for every one.
func TestModelMatchesProgram(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("AEGIS_DIFF_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (rerun with AEGIS_DIFF_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0x5eed))

	const perPhase = 35_000
	g := newGenerator(rng)
	allowRules := []string{
		"203.0.113.0/24,tcp/22", "203.0.113.7,udp", "192.0.2.0/30,any/53", "192.0.2.4/31",
		"2001:db8:3::/64,tcp/22", "2001:db8:3::7,udp", "2001:db8:1::/126,any/53", "2001:db8:1::4/127",
	}
	phases := []struct {
		name       string
		controller netip.Addr
		allow      bool
		monitor    bool
	}{
		{"v4 controller, allow rules", g.ctl4, true, false},
		{"v6 controller, monitor", g.ctl6, true, true},
		{"no controller, no allow rules", netip.Addr{}, false, false},
	}

	total := 0
	for _, ph := range phases {
		h := newHarness(t)
		env := &bpf.Env{
			Now:        state.Now(),
			SessionsV4: map[bpf.AegisSessionKeyV4]*bpf.AegisSessionValue{},
			SessionsV6: map[bpf.AegisSessionKeyV6]*bpf.AegisSessionValue{},
			FlowsV4:    map[bpf.AegisFlowKeyV4]*bpf.AegisFlowValue{},
			FlowsV6:    map[bpf.AegisFlowKeyV6]*bpf.AegisFlowValue{},
			Frags:      map[bpf.AegisFragKey]*bpf.AegisFragValue{},
		}
		var asked [2]int // the model's routing questions, answered false and true
		env.Local = func(a netip.Addr) bool {
			l := fibLocal(a)
			asked[b2i(l)]++
			return l
		}
		var a4, a6 uint16
		if ph.allow {
			a4, a6 = h.setAllow(t, allowRules...)
			for _, s := range allowRules {
				r, _ := state.ParseAllowRule(s)
				env.Allow = append(env.Allow, r)
			}
		}
		cfg := state.Config{
			Controller: ph.controller, ControllerPort: 443, GRPCPort: 50001,
			DefaultIdleTimeout: time.Hour, Monitor: ph.monitor,
			AllowV4Prefixes: a4, AllowV6Prefixes: a6,
		}
		h.setConfig(t, cfg)
		v, _ := cfg.Value()
		env.Config = v
		g.grantSessions(t, h, env)

		var counts [bpf.StatsSlots]uint64
		for i := 0; i < perPhase; i++ {
			pkt := g.frame()
			wantAction, wantReason := bpf.Verdict(pkt, env)

			before := readCounter(t, h.maps.Stats, wantReason)
			gotAction, err := h.fib.run(h.prog, pkt)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			after := readCounter(t, h.maps.Stats, wantReason)
			if bpf.Action(gotAction) != wantAction || after != before+1 {
				_, gotReason := h.run(t, pkt)
				t.Fatalf("%s: packet %d: program action %d reason %v, model action %d reason %v\n%s",
					ph.name, i, gotAction, gotReason, wantAction, wantReason, hex.Dump(pkt))
			}
			counts[wantReason]++
		}

		// Every packet was counted once, under the model's reason.
		stats, err := h.maps.ReadStats()
		if err != nil {
			t.Fatal(err)
		}
		for r := range stats {
			if stats[r].Packets != counts[r] {
				t.Fatalf("%s: reason %v counted %d, model %d", ph.name, bpf.Reason(r), stats[r].Packets, counts[r])
			}
		}
		for _, r := range bpf.Reasons {
			if counts[r] > 0 {
				t.Logf("%s: %-15v %6d", ph.name, r, counts[r])
			}
		}
		// Both answers of the routing table, on both bypasses, often
		// enough to have met each kind of destination.
		t.Logf("%s: local destinations %d, forwarded or dropping %d", ph.name, asked[1], asked[0])
		if asked[0] < 150 || asked[1] < 150 || counts[bpf.ReasonNDP] < 300 {
			t.Fatalf("%s: the bypasses were barely exercised", ph.name)
		}
		total += perPhase
	}
	if total < 100_000 {
		t.Fatalf("only %d packets compared", total)
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func readCounter(t *testing.T, stats *ebpf.Map, r bpf.Reason) uint64 {
	t.Helper()
	var perCPU []bpf.AegisStatsValue
	if err := stats.Lookup(uint32(r), &perCPU); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, c := range perCPU {
		n += c.Packets
	}
	return n
}

// generator draws frames from small address and port pools, so that many
// of them hit sessions, allow rules and the controller.
type generator struct {
	rng              *rand.Rand
	src4, dst4       []netip.Addr
	src6, dst6       []netip.Addr
	ctl4, ctl6       netip.Addr
	ports            []uint16
	sessionProtocols []state.Protocol
}

func newGenerator(rng *rand.Rand) *generator {
	g := &generator{
		rng:              rng,
		ctl4:             netip.MustParseAddr("198.51.100.5"),
		ctl6:             netip.MustParseAddr("2001:db8:2::5"),
		ports:            []uint16{22, 53, 443, 8080, 50001},
		sessionProtocols: []state.Protocol{state.TCP, state.UDP},
	}
	for i := 1; i <= 6; i++ {
		g.src4 = append(g.src4, netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}))
		g.src6 = append(g.src6, netip.MustParseAddr("2001:db8:1::"+strconv.Itoa(i)))
	}
	g.src4 = append(g.src4, netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("203.0.113.8"), g.ctl4)
	g.src6 = append(g.src6, netip.MustParseAddr("2001:db8:3::7"), netip.MustParseAddr("2001:db8:3::8"), g.ctl6,
		netip.MustParseAddr("fe80::2"))
	// Destinations of every kind fibLocal tells apart (see fib_test.go):
	// 198.51.100.1 is the gateway's, .2 has a neighbour entry, .3 and the
	// controller are on a connected subnet.
	for i := 1; i <= 3; i++ {
		g.dst4 = append(g.dst4, netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}))
		g.dst6 = append(g.dst6, netip.MustParseAddr("2001:db8:2::"+strconv.Itoa(i)))
	}
	g.dst4 = append(g.dst4, g.ctl4)
	g.dst6 = append(g.dst6, g.ctl6)
	g.dst4 = append(g.dst4, addrs(
		"192.0.2.1", "192.0.2.255", "127.0.0.1", // local, broadcast, loopback
		"203.0.113.9", "203.0.113.70", "203.0.113.130", "203.0.113.200", // via a gateway, prohibit, unreachable, blackhole
		"203.0.113.250",          // no route
		"224.0.0.1", "239.1.2.3", // multicast
	)...)
	g.dst6 = append(g.dst6, addrs(
		"2001:db8:1::1", "2001:db8:1::", "::1", // local, anycast, loopback
		"2001:db8:3::9", "2001:db8:5::1", "2001:db8:6::1", "2001:db8:7::1", // via a gateway, prohibit, unreachable, blackhole
		"2001:db8:9::1",      // no route
		"fe80::1", "fe80::2", // link-local
		"ff02::1", "ff02::2", "ff02::1:ff00:1", // link-scope multicast: all nodes, all routers, solicited-node
		"ff05::2", "ff12::1", // other multicast
	)...)
	return g
}

func pick[T any](rng *rand.Rand, s []T) T { return s[rng.IntN(len(s))] }

// grantSessions gives about half of the pool's flows a session, live or
// expired in each of the ways the data path checks, in both the program's
// maps and the model's. Timestamps are hours from any boundary, so the few
// seconds between the model's clock and the kernel's do not matter.
func (g *generator) grantSessions(t *testing.T, h *harness, env *bpf.Env) {
	now := env.Now
	for _, fam := range [][2][]netip.Addr{{g.src4, g.dst4}, {g.src6, g.dst6}} {
		for _, src := range fam[0] {
			for _, dst := range fam[1] {
				for _, port := range g.ports {
					for _, proto := range g.sessionProtocols {
						if g.rng.IntN(2) == 0 {
							continue
						}
						s := state.Session{
							Key:  state.Key{Src: src, Dst: dst, Port: port, Proto: proto},
							User: "u" + strconv.Itoa(g.rng.IntN(1000)), Created: now, LastSeen: now,
							IdleTimeout: time.Hour,
						}
						switch g.rng.IntN(5) {
						case 0: // idle past its own timeout
							s.LastSeen = now - uint64(2*time.Hour)
						case 1: // past its lifetime
							s.Expires = now - uint64(time.Hour)
						case 2: // live, lifetime ahead, stale enough to be refreshed
							s.Expires = now + uint64(time.Hour)
							s.LastSeen = now - uint64(10*time.Minute)
						case 3: // default idle timeout (1h), idle 2h
							s.IdleTimeout = 0
							s.LastSeen = now - uint64(2*time.Hour)
						}
						h.grant(t, s)
						v, _ := h.maps.Lookup(s.Key)
						raw := bpf.AegisSessionValue{LastSeenNs: v.LastSeen, CreatedNs: v.Created, ExpiresNs: v.Expires, IdleTimeoutNs: uint64(v.IdleTimeout)}
						if src.Is4() {
							env.SessionsV4[bpf.AegisSessionKeyV4{Src: src.As4(), Dst: dst.As4(), Dport: port, Proto: uint8(proto)}] = &raw
						} else {
							env.SessionsV6[bpf.AegisSessionKeyV6{Src: src.As16(), Dst: dst.As16(), Dport: port, Proto: uint8(proto)}] = &raw
						}
					}
				}
			}
		}
	}
}

func (g *generator) frame() []byte {
	rng := g.rng
	if rng.IntN(20) == 0 { // random bytes
		b := make([]byte, 14+rng.IntN(100))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if rng.IntN(2) == 0 { // with a plausible EtherType
			et := pick(rng, []uint16{0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806})
			b[12], b[13] = byte(et>>8), byte(et)
		}
		return b
	}

	var f tu.Frame
	switch n := rng.IntN(10); {
	case n < 2:
		f.VLANs = []uint16{0x8100}
	case n < 3:
		f.VLANs = []uint16{0x88A8, 0x8100}
	case n < 4 && rng.IntN(4) == 0:
		f.VLANs = []uint16{0x88A8, 0x8100, 0x8100}
	}
	switch n := rng.IntN(20); {
	case n == 0:
		f.EtherType = 0x0806
	case n == 1:
		f.EtherType = pick(rng, []uint16{0x88CC, 0x8863, 0x0842})
	case n < 11:
		f.Src, f.Dst = pick(rng, g.src4), pick(rng, g.dst4)
		if rng.IntN(3) == 0 {
			f.IPv4Options = 4 * rng.IntN(11)
		}
	default:
		f.Src, f.Dst = pick(rng, g.src6), pick(rng, g.dst6)
		if rng.IntN(3) == 0 {
			for range rng.IntN(9) {
				f.IPv6Ext = append(f.IPv6Ext, pick(rng, []uint8{0, 43, 44, 51, 60}))
			}
		}
	}
	switch n := rng.IntN(20); {
	case n < 8:
		f.Proto = tu.ProtoTCP
	case n < 14:
		f.Proto = tu.ProtoUDP
	case n < 18:
		f.Proto = tu.ProtoICMP
		if f.Src.Is6() {
			f.Proto = tu.ProtoICMPv6
		}
		f.ICMPType = uint8(128 + rng.IntN(12))
		if rng.IntN(2) == 0 {
			f.ICMPType = uint8(133 + rng.IntN(5)) // neighbour discovery
		}
		if rng.IntN(6) == 0 {
			f.ICMPCode = uint8(1 + rng.IntN(255))
		}
	default:
		f.Proto = pick(rng, []uint8{tu.ProtoSCTP, 59, 47, 0})
	}
	// Hop limit 255 (neighbour discovery's) for most, one hop less, or
	// anything.
	switch n := rng.IntN(6); {
	case n < 4:
		f.HopLimit = 255
	case n < 5:
		f.HopLimit = 254
	default:
		f.HopLimit = uint8(rng.Uint32())
	}
	f.SrcPort = uint16(rng.Uint32())
	f.DstPort = pick(rng, g.ports)
	if rng.IntN(8) == 0 {
		f.DstPort = uint16(rng.Uint32())
	}
	// A candidate for the controller's gRPC bypass, to any destination.
	if f.Proto == tu.ProtoTCP && rng.IntN(4) == 0 {
		f.DstPort = 50001
		if f.Src.Is4() {
			f.Src = g.ctl4
		} else {
			f.Src = g.ctl6
		}
	}
	if rng.IntN(10) == 0 {
		f.FragOffset = uint16(rng.IntN(3)) * uint16(1+rng.IntN(100))
		f.MoreFragments = rng.IntN(2) == 0
		if f.Src.Is6() && len(f.IPv6Ext) == 0 {
			f.IPv6Ext = []uint8{44}
		}
	}
	f.Payload = rng.IntN(64)
	b := f.Bytes()

	switch n := rng.IntN(10); {
	case n < 2: // truncated anywhere
		b = b[:14+rng.IntN(len(b)-13)]
	case n < 4: // a few header bytes changed
		for range 1 + rng.IntN(3) {
			b[rng.IntN(min(len(b), 14+8+40+64))] = byte(rng.Uint32())
		}
	case n < 5: // trailing padding, as on a minimum-size Ethernet frame
		b = append(b, make([]byte, rng.IntN(32))...)
	}
	return b
}
