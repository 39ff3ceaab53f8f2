package explain_test

import (
	"encoding/hex"
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
}

func load(t *testing.T, monitor bool) *live {
	t.Helper()
	tu.RequireKernel(t)
	spec, err := bpf.LoadAegis()
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
		Ifaces: o.Ifaces, Events: o.Events, EventLimits: o.EventLimits}
	var rules []state.AllowRule
	for _, s := range []string{"203.0.113.0/24,tcp/22", "203.0.113.7,udp", "192.0.2.0/30,any/53", "2001:db8:3::/64,tcp/22", "2001:db8:1::/126,any/53"} {
		r, err := state.ParseAllowRule(s)
		if err != nil {
			t.Fatal(err)
		}
		rules = append(rules, r)
	}
	e, err := state.CompileAllow(rules)
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
	cfg := state.Config{DefaultIdleTimeout: time.Hour, Monitor: monitor,
		AllowV4Prefixes: uint16(len(e.V4)), AllowV6Prefixes: uint16(len(e.V6))}
	if _, err := l.maps.WriteConfig(cfg); err != nil {
		t.Fatal(err)
	}
	return l
}

// pools of addresses and ports small enough that generated flows hit the
// sessions, flows and rules often.
var (
	srcs4 = []string{"192.0.2.1", "192.0.2.2", "192.0.2.9", "203.0.113.7", "203.0.113.8", "198.51.100.77"}
	dsts4 = []string{"198.51.100.10", "198.51.100.11"}
	srcs6 = []string{"2001:db8:1::1", "2001:db8:1::9", "2001:db8:3::7", "2001:db8:5::1"}
	dsts6 = []string{"2001:db8:2::10", "2001:db8:2::11"}
	ports = []uint16{22, 53, 80, 443}
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

// Explain gives, for 10,000 generated flows against live maps holding
// sessions (live, idle-expired, past their lifetime, any-protocol), reply
// flows (live and stale) and allow rules, exactly the action and reason
// the real program then gives the same packet, and moves no counter and
// no timestamp doing so. With and without monitor mode.
func TestExplainMatchesProgram(t *testing.T) {
	for _, monitor := range []bool{false, true} {
		seed := uint64(time.Now().UnixNano())
		t.Logf("monitor %v, seed %d", monitor, seed)
		rng := rand.New(rand.NewPCG(seed, 1))
		l := load(t, monitor)
		l.populate(t, rng)
		seen := map[bpf.Reason]int{}
		const n = 10_000
		for i := range n {
			f := explain.Flow{Port: pick(rng, ports), Sport: pick(rng, sport), Proto: pick(rng, []uint8{6, 17})}
			if rng.IntN(2) == 0 {
				f.Src, f.Dst = netip.MustParseAddr(pick(rng, srcs4)), netip.MustParseAddr(pick(rng, dsts4))
			} else {
				f.Src, f.Dst = netip.MustParseAddr(pick(rng, srcs6)), netip.MustParseAddr(pick(rng, dsts6))
			}
			before := l.observe(t)
			res, err := explain.Explain(l.maps, f, nil)
			if err != nil {
				t.Fatal(err)
			}
			if after := l.observe(t); !reflect.DeepEqual(before, after) {
				t.Fatalf("flow %d %+v: explain changed the maps", i, f)
			}
			pkt, err := f.Frame()
			if err != nil {
				t.Fatal(err)
			}
			ret, err := l.objs.AegisXdp.Run(&ebpf.RunOptions{Data: pkt})
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
				t.Fatalf("flow %d %+v: program %d %v, explain %d %v\n%s", i, f, ret, bpf.Reason(moved), res.Action, res.Reason, hex.Dump(pkt))
			}
			if monitor && res.Reason == bpf.ReasonMonitor && res.Cause.Pass() {
				t.Fatalf("flow %d: monitor with a passing cause %v", i, res.Cause)
			}
			if (res.Cause == bpf.ReasonSession || res.Cause == bpf.ReasonExpired) != (res.Session != nil) || (res.Cause == bpf.ReasonReply) != (res.ReplyFlow != nil) {
				t.Fatalf("flow %d: cause %v, session %v, flow %v", i, res.Cause, res.Session, res.ReplyFlow)
			}
			seen[res.Cause]++
		}
		for _, r := range []bpf.Reason{bpf.ReasonSession, bpf.ReasonExpired, bpf.ReasonReply, bpf.ReasonAllowlist, bpf.ReasonNoSession} {
			if seen[r] == 0 {
				t.Errorf("monitor %v: no flow explained as %v (%v)", monitor, r, seen)
			}
		}
		t.Logf("monitor %v: %v", monitor, seen)
	}
}

// A snapshot that leaves out the any-protocol session is caught by the
// same comparison.
func TestExplainMutationIsCaught(t *testing.T) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	l := load(t, false)
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
			t.Logf("caught after %d flows: %+v explained as %v", i, f, res.Reason)
			return
		}
	}
	t.Fatal("a snapshot without any-protocol sessions matched the program on 10,000 flows")
}
