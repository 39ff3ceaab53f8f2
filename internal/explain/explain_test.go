package explain_test

import (
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/explain"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

type live struct {
	objs bpf.AegisObjects
	maps *state.Maps
	gw   *tu.Routed
}

// setup is one configuration the comparison runs under.
type setup struct {
	monitor bool
	// controller configures the controller bypasses (login port 443, gRPC
	// port 50001); forwarding off makes bpf_fib_lookup answer
	// FWD_DISABLED, so that no destination is local.
	controller   netip.Addr
	noForwarding bool
}

// Controller addresses: on the gateway's private side, and among the
// flows' sources and destinations.
var (
	ctl4 = netip.MustParseAddr("198.51.100.11")
	ctl6 = netip.MustParseAddr("2001:db8:2::11")
)

func load(t *testing.T, opts setup) *live {
	t.Helper()
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	l := &live{}
	if err := spec.LoadAndAssign(&l.objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.objs.Close() })
	o := &l.objs
	l.maps = &state.Maps{SessionsV4: o.SessionsV4, SessionsV6: o.SessionsV6, AllowV4: o.AllowV4, AllowV6: o.AllowV6,
		Config: o.Config, Stats: o.Stats, SweepSeq: o.SweepSeq, FlowsV4: o.FlowsV4, FlowsV6: o.FlowsV6, Frags: o.Frags,
		Ifaces: o.Ifaces, Events: o.Events, EventLimits: o.EventLimits, AllowHits: o.AllowHits}
	l.gw = newGateway(t, !opts.noForwarding)
	e, err := state.CompileAllow(tu.AllowRules(t, "203.0.113.0/24,tcp/22", "203.0.113.7,udp", "192.0.2.0/30,any/53",
		"2001:db8:3::/64,tcp/22", "2001:db8:1::/126,any/53"))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range e.V4 {
		if err := o.AllowV4.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range e.V6 {
		if err := o.AllowV6.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	cfg := state.Config{DefaultIdleTimeout: time.Hour, Monitor: opts.monitor,
		AllowV4Prefixes: uint16(len(e.V4)), AllowV6Prefixes: uint16(len(e.V6)),
		ControllerPort: 443, GRPCPort: 50001}
	cfg.Controller = opts.controller
	if _, err := l.maps.WriteConfig(cfg); err != nil {
		t.Fatal(err)
	}
	return l
}

// pools of addresses and ports small enough that generated flows hit the
// sessions, flows and rules often.
// The controller is a source and a destination; the destinations are of
// every kind the gateway's routing table tells apart (see newGateway).
var (
	srcs4 = []string{"192.0.2.1", "192.0.2.2", "192.0.2.9", "203.0.113.7", "203.0.113.8", "198.51.100.77", ctl4.String()}
	dsts4 = []string{"198.51.100.10", "198.51.100.11", "198.51.100.1", "192.0.2.1", "198.51.100.255",
		"203.0.113.1", "203.0.113.100", "203.0.113.200", "203.0.113.150"}
	srcs6 = []string{"2001:db8:1::1", "2001:db8:1::9", "2001:db8:3::7", "2001:db8:5::1", ctl6.String()}
	dsts6 = []string{"2001:db8:2::10", "2001:db8:2::11", "2001:db8:2::1", "2001:db8:1::1",
		"2001:db8:5::1", "2001:db8:6::1", "2001:db8:7::1", "2001:db8:9::1"}
	ports = []uint16{22, 53, 80, 443, 50001}
	sport = []uint16{40000, 443, 53}
)

func pick[T any](rng *rand.Rand, s []T) T { return s[rng.IntN(len(s))] }

func (l *live) populate(t *testing.T, rng *rand.Rand) {
	t.Helper()
	now := state.Now()
	for i := 0; i < 60; i++ {
		v4 := i%2 == 0
		src, dst := netip.MustParseAddr(pick(rng, srcs6)), netip.MustParseAddr(pick(rng, dsts6))
		if v4 {
			src, dst = netip.MustParseAddr(pick(rng, srcs4)), netip.MustParseAddr(pick(rng, dsts4))
		}
		proto := pick(rng, []state.Protocol{state.TCP, state.UDP, 0})
		s := state.Session{Key: state.Key{Src: src, Dst: dst, Port: pick(rng, ports), Proto: proto},
			User: pick(rng, []string{"alice", "bob"}), LastSeen: now, Created: now, IdleTimeout: time.Hour}
		switch rng.IntN(4) {
		case 0: // idle for two hours: expired
			s.LastSeen, s.Created = now-uint64(2*time.Hour), now-uint64(3*time.Hour)
		case 1: // lifetime over
			s.Created, s.Expires = now-uint64(2*time.Hour), now-uint64(time.Hour)
		case 2:
			s.Expires = now + uint64(time.Hour)
		}
		if proto != 0 {
			if err := l.maps.Grant(s); err != nil {
				t.Fatal(err)
			}
			continue
		}
		// An any-protocol session: the data path's, written directly.
		v := bpf.AegisSessionValue{LastSeenNs: s.LastSeen, CreatedNs: s.Created, ExpiresNs: s.Expires, IdleTimeoutNs: uint64(s.IdleTimeout)}
		var err error
		if v4 {
			err = l.objs.SessionsV4.Put(&bpf.AegisSessionKeyV4{Src: src.As4(), Dst: dst.As4(), Dport: s.Port}, &v)
		} else {
			err = l.objs.SessionsV6.Put(&bpf.AegisSessionKeyV6{Src: src.As16(), Dst: dst.As16(), Dport: s.Port}, &v)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 40; i++ {
		last := now
		if i%4 == 0 {
			last = now - uint64(3*time.Hour) // beyond every flow timeout
		}
		fv := bpf.AegisFlowValue{LastSeenNs: last, CreatedNs: last}
		proto := pick(rng, []uint8{6, 17})
		if i%2 == 0 {
			k := bpf.AegisFlowKeyV4{Src: netip.MustParseAddr(pick(rng, srcs4)).As4(), Dst: netip.MustParseAddr(pick(rng, dsts4)).As4(),
				Sport: pick(rng, sport), Dport: pick(rng, ports), Proto: proto}
			if err := l.objs.FlowsV4.Put(&k, &fv); err != nil {
				t.Fatal(err)
			}
		} else {
			k := bpf.AegisFlowKeyV6{Src: netip.MustParseAddr(pick(rng, srcs6)).As16(), Dst: netip.MustParseAddr(pick(rng, dsts6)).As16(),
				Sport: pick(rng, sport), Dport: pick(rng, ports), Proto: proto}
			if err := l.objs.FlowsV6.Put(&k, &fv); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// observable is everything explain must leave alone: the counters and
// every session's and flow's value.
type observable struct {
	stats    [bpf.StatsSlots]state.Counter
	sessions map[any]bpf.AegisSessionValue
	flows    map[any]bpf.AegisFlowValue
}

func dump[K comparable, V any](t *testing.T, m *ebpf.Map, into map[any]V) {
	t.Helper()
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		into[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
}

func (l *live) observe(t *testing.T) observable {
	t.Helper()
	st, err := l.maps.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	o := observable{stats: st, sessions: map[any]bpf.AegisSessionValue{}, flows: map[any]bpf.AegisFlowValue{}}
	dump[bpf.AegisSessionKeyV4](t, l.objs.SessionsV4, o.sessions)
	dump[bpf.AegisSessionKeyV6](t, l.objs.SessionsV6, o.sessions)
	dump[bpf.AegisFlowKeyV4](t, l.objs.FlowsV4, o.flows)
	dump[bpf.AegisFlowKeyV6](t, l.objs.FlowsV6, o.flows)
	return o
}

// flow draws a flow from the pools; with a controller configured, one in
// four is a bypass candidate: to the controller's login port, or from the
// controller to the gRPC port (to any destination, local or not).
func flowFor(rng *rand.Rand, ctl netip.Addr) explain.Flow {
	f := explain.Flow{Port: pick(rng, ports), Sport: pick(rng, sport), Proto: pick(rng, []uint8{6, 17})}
	v4 := rng.IntN(2) == 0
	if ctl.IsValid() && rng.IntN(4) == 0 {
		v4 = ctl.Is4()
	}
	if v4 {
		f.Src, f.Dst = netip.MustParseAddr(pick(rng, srcs4)), netip.MustParseAddr(pick(rng, dsts4))
	} else {
		f.Src, f.Dst = netip.MustParseAddr(pick(rng, srcs6)), netip.MustParseAddr(pick(rng, dsts6))
	}
	if ctl.IsValid() && v4 == ctl.Is4() && rng.IntN(4) == 0 {
		f.Proto = 6
		if rng.IntN(2) == 0 {
			f.Dst, f.Port = ctl, 443
		} else {
			f.Src, f.Port = ctl, 50001
		}
	}
	return f
}

// locality counts the answers of the probe explain asks.
type locality struct {
	probe  *explain.Probe
	answer [2]int // not local, local
}

func (c *locality) local(dst netip.Addr) bool {
	l := c.probe.Local(dst)
	c.answer[b2i(l)]++
	return l
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Explain gives, for 10,000 generated flows against live maps holding
// sessions (live, idle-expired, past their lifetime, any-protocol), reply
// flows (live and stale) and allow rules, exactly the action and reason
// the real program then gives the same packet, the allow rule it counts
// the packet against, and moves no counter and no timestamp doing so.
// Without a controller; with the controller's bypasses
// configured: flows from the controller to the gRPC port, to the
// gateway's own addresses, its broadcast address, an unrouted address
// (all local to bpf_fib_lookup) and to forwarded, unreachable and
// blackholed ones; flows to the controller's login port; in monitor mode;
// and with forwarding off, when bpf_fib_lookup calls nothing local.
func TestExplainMatchesProgram(t *testing.T) {
	for _, o := range []setup{
		{}, {controller: ctl4}, {controller: ctl6, monitor: true}, {controller: ctl4, noForwarding: true},
	} {
		seed := uint64(time.Now().UnixNano())
		name := fmt.Sprintf("monitor %v, controller %v, forwarding %v", o.monitor, o.controller, !o.noForwarding)
		t.Logf("%s: seed %d", name, seed)
		rng := rand.New(rand.NewPCG(seed, 1))
		l := load(t, o)
		l.populate(t, rng)
		loc := &locality{probe: explain.NewProbe(l.objs.AegisLocality, l.gw.Ifindex)}
		seen := map[bpf.Reason]int{}
		const n = 10_000
		for i := range n {
			f := flowFor(rng, o.controller)
			before := l.observe(t)
			var res *explain.Result
			var err error
			l.gw.Thread.Do(func() { res, err = explain.Explain(l.maps, f, loc.local) })
			if err != nil {
				t.Fatal(err)
			}
			if loc.probe.Err != nil {
				t.Fatal(loc.probe.Err)
			}
			if after := l.observe(t); !reflect.DeepEqual(before, after) {
				t.Fatalf("flow %d %+v: explain changed the maps", i, f)
			}
			pkt, err := f.Frame()
			if err != nil {
				t.Fatal(err)
			}
			var hitsBefore uint64
			if res.AllowRule != nil {
				hitsBefore = l.allowHits(t, f.Src, res.AllowRule.Rule)
			}
			ret, err := l.gw.Run(l.objs.AegisXdp, pkt)
			if err != nil {
				t.Fatal(err)
			}
			stats, err := l.maps.ReadStats()
			if err != nil {
				t.Fatal(err)
			}
			moved := -1
			for r := range stats {
				if stats[r].Packets != before.stats[r].Packets {
					moved = r
				}
			}
			if bpf.Action(ret) != res.Action || bpf.Reason(moved) != res.Reason {
				t.Fatalf("%s: flow %d %+v: program %d %v, explain %d %v\n%s", name, i, f, ret, bpf.Reason(moved), res.Action, res.Reason, hex.Dump(pkt))
			}
			if (res.Cause == bpf.ReasonAllowlist) != (res.AllowRule != nil) {
				t.Fatalf("flow %d: cause %v, allow rule %+v", i, res.Cause, res.AllowRule)
			}
			if res.AllowRule != nil {
				if got := l.allowHits(t, f.Src, res.AllowRule.Rule); got != hitsBefore+1 {
					t.Fatalf("flow %d %+v: explained as rule %+v, whose counter went from %d to %d", i, f, *res.AllowRule, hitsBefore, got)
				}
			}
			if o.monitor && res.Reason == bpf.ReasonMonitor && res.Cause.Pass() {
				t.Fatalf("flow %d: monitor with a passing cause %v", i, res.Cause)
			}
			if (res.Cause == bpf.ReasonSession || res.Cause == bpf.ReasonExpired) != (res.Session != nil) || (res.Cause == bpf.ReasonReply) != (res.ReplyFlow != nil) {
				t.Fatalf("flow %d: cause %v, session %v, flow %v", i, res.Cause, res.Session, res.ReplyFlow)
			}
			seen[res.Cause]++
		}
		for _, r := range []bpf.Reason{bpf.ReasonSession, bpf.ReasonExpired, bpf.ReasonReply, bpf.ReasonAllowlist, bpf.ReasonNoSession} {
			if seen[r] == 0 {
				t.Errorf("%s: no flow explained as %v (%v)", name, r, seen)
			}
		}
		switch {
		case !o.controller.IsValid():
			if seen[bpf.ReasonController] != 0 || loc.answer != [2]int{} {
				t.Errorf("%s: controller bypass without a controller (%v, locality asked %v)", name, seen, loc.answer)
			}
		case o.noForwarding:
			// Only the login port passes; the gRPC bypass finds nothing local.
			if seen[bpf.ReasonController] < 100 || loc.answer[1] != 0 || loc.answer[0] < 100 {
				t.Errorf("%s: controller %d, locality answers %v", name, seen[bpf.ReasonController], loc.answer)
			}
		default:
			if seen[bpf.ReasonController] < 100 || loc.answer[0] < 50 || loc.answer[1] < 50 {
				t.Errorf("%s: controller %d, locality answers %v: the bypasses were barely exercised", name, seen[bpf.ReasonController], loc.answer)
			}
		}
		t.Logf("%s: %v; locality: %d local, %d not", name, seen, loc.answer[1], loc.answer[0])
	}
}

// allowHits reads the allow_hits counter of a rule id of src's family,
// summed over CPUs.
func (l *live) allowHits(t *testing.T, src netip.Addr, id uint8) uint64 {
	t.Helper()
	fam := uint8(4)
	if src.Is6() {
		fam = 6
	}
	var perCPU []uint64
	if err := l.objs.AllowHits.Lookup(bpf.AllowHitSlot(fam, id), &perCPU); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, c := range perCPU {
		n += c
	}
	return n
}

// The routing table read over netlink (RoutedLocally) is not the data
// path's answer: with forwarding off bpf_fib_lookup calls nothing local,
// while the route to one of the gateway's own addresses is still a local
// route. The same comparison catches the difference; the probe gets it
// right.
func TestExplainRouteQueryIsNotExact(t *testing.T) {
	l := load(t, setup{controller: ctl4, noForwarding: true})
	f := explain.Flow{Src: ctl4, Dst: netip.MustParseAddr("198.51.100.10"), Port: 50001, Proto: 6}
	pkt, err := f.Frame()
	if err != nil {
		t.Fatal(err)
	}
	ret, err := l.gw.Run(l.objs.AegisXdp, pkt)
	if err != nil {
		t.Fatal(err)
	}
	probe := explain.NewProbe(l.objs.AegisLocality, l.gw.Ifindex)
	for _, c := range []struct {
		name  string
		local explain.Local
		exact bool
	}{{"route query", explain.RoutedLocally, false}, {"probe", probe.Local, true}} {
		var res *explain.Result
		l.gw.Thread.Do(func() { res, err = explain.Explain(l.maps, f, c.local) })
		if err != nil {
			t.Fatal(err)
		}
		if (bpf.Action(ret) == res.Action) != c.exact {
			t.Errorf("%s: explained %v %v, the program returned %d", c.name, res.Action, res.Reason, ret)
		}
	}
	if probe.Err != nil {
		t.Fatal(probe.Err)
	}
}

// A snapshot that leaves out the any-protocol session is caught by the
// same comparison.
func TestExplainMutationIsCaught(t *testing.T) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	l := load(t, setup{})
	l.populate(t, rng)
	defer explain.SkipAnyProtocol()()
	for i := range 10_000 {
		f := explain.Flow{Port: pick(rng, ports), Sport: pick(rng, sport), Proto: pick(rng, []uint8{6, 17}),
			Src: netip.MustParseAddr(pick(rng, srcs4)), Dst: netip.MustParseAddr(pick(rng, dsts4))}
		res, err := explain.Explain(l.maps, f, nil)
		if err != nil {
			t.Fatal(err)
		}
		pkt, _ := f.Frame()
		before, _ := l.maps.ReadStats()
		if _, err := l.objs.AegisXdp.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
			t.Fatal(err)
		}
		after, _ := l.maps.ReadStats()
		if after[res.Reason].Packets == before[res.Reason].Packets {
			// Caught for the right reason: the program decided the flow
			// by a session (live or expired) the snapshot left out.
			bySession := func(r bpf.Reason) bool { return after[r].Packets > before[r].Packets && res.Reason != r }
			if !bySession(bpf.ReasonSession) && !bySession(bpf.ReasonExpired) {
				t.Fatalf("%+v explained as %v: a mismatch, but not by the left-out any-protocol session", f, res.Reason)
			}
			t.Logf("caught after %d flows: %+v explained as %v", i, f, res.Reason)
			return
		}
	}
	t.Fatal("a snapshot without any-protocol sessions matched the program on 10,000 flows")
}
