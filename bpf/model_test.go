package bpf_test

import (
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// TestModelMatchesProgram runs generated frames through the real programs
// with BPF_PROG_TEST_RUN and through the Go model, under three
// configurations, and requires the same action and the same counted reason
// for every ingress frame, and the same flow table after every egress
// frame.
//
// Ingress frames: valid, truncated, mutated and random; VLAN-tagged; IPv4
// with options, IPv6 with extension headers; bypass candidates to local,
// routed, unrouted, dropping, link-local and multicast destinations;
// replies to recorded flows; ICMP errors quoting sessions, flows and
// random tuples, truncated or not; first and later fragments, with and
// without a first fragment that passed; echo requests and replies.
// Egress frames: outbound TCP of every flag combination that matters, UDP,
// echo requests, replies of granted sessions, packets of recorded flows.
func TestModelMatchesProgram(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("AEGIS_DIFF_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (rerun with AEGIS_DIFF_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0x5eed))

	const perPhase = 70_000
	g := newGenerator(rng)
	total := 0
	for _, ph := range diffPhases(g) {
		d := newDiff(t, g, ph)
		for i := range perPhase {
			if i == perPhase/2 {
				d.togglePassEvents(t)
			}
			if err := d.step(i); err != nil {
				t.Fatalf("%s: %v", ph.name, err)
			}
		}
		d.finish(t)
		total += perPhase - d.refused
	}
	if total < 200_000 {
		t.Fatalf("only %d packets compared", total)
	}
}

// A model with one rule broken must be caught by the same comparison.
func TestModelMutationIsCaught(t *testing.T) {
	for _, m := range []string{"egress-synack", "egress-no-tomb", "related-any-dst", "event-tuple-after-parse", "allow-hit-first-rule"} {
		t.Run(m, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, 0x5eed))
			g := newGenerator(rng)
			d := newDiff(t, g, diffPhases(g)[0])
			restore := bpf.SetMutation(m)
			defer restore()
			for i := range 100_000 {
				if err := d.step(i); err != nil {
					t.Logf("caught after %d frames: %v", i, err)
					return
				}
			}
			t.Fatal("the mutated model matched the program on 100,000 frames")
		})
	}
}

type diffPhase struct {
	name       string
	controller netip.Addr
	allow      bool
	monitor    bool
	flows      bool
	// marks: the port marks are trusted, as the daemons leave them, so
	// the program skips lookups at unmarked ports; otherwise it makes
	// every lookup. The verdicts must be the same.
	marks bool
	// passEvents: passes emit verdict events in the phase's first half;
	// the second half turns them the other way. With them off, as by
	// default, a live exact-protocol session's common frame takes the
	// program's express lane instead of the general path.
	passEvents bool
}

func diffPhases(g *generator) []diffPhase {
	return []diffPhase{
		{"v4 controller, allow rules, flows, port marks, pass events off then on", g.ctl4, true, false, true, true, false},
		{"v6 controller, allow rules, monitor, flows, port marks, pass events on then off", g.ctl6, true, true, true, true, true},
		{"no controller, no allow rules, no flows, marks untrusted, pass events off then on", netip.Addr{}, false, false, false, false, false},
	}
}

// The allow rules of the phases that have them: TCP, UDP and any-protocol
// rules, and ICMP rules (one with a port, which ICMP never matches). For
// the hit counters, rules that overlap every way attribution must settle:
// the same pair from a covering prefix (192.0.2.0/29,any/53 over /30's),
// a pair a broader one covers (/29's tcp/22 under 192.0.2.4/31), and two
// pairs that both admit a packet (192.0.2.6's udp and /29's any/53).
func diffAllowRules() []state.AllowRule {
	var rules []state.AllowRule
	for _, s := range []string{
		"203.0.113.0/24,tcp/22", "203.0.113.7,udp", "192.0.2.0/30,any/53", "192.0.2.4/31",
		"192.0.2.0/29,any/53", "192.0.2.6,udp", "192.0.2.0/29,tcp/22",
		"2001:db8:3::/64,tcp/22", "2001:db8:3::7,udp", "2001:db8:1::/126,any/53", "2001:db8:1::4/127",
		"2001:db8:1::/125,any/53", "2001:db8:1::6,udp", "2001:db8:1::/125,tcp/22",
	} {
		r, _ := state.ParseAllowRule(s)
		rules = append(rules, r)
	}
	return append(rules,
		state.AllowRule{Prefix: netip.MustParsePrefix("203.0.113.0/25"), Proto: tu.ProtoICMP},
		state.AllowRule{Prefix: netip.MustParsePrefix("192.0.2.6/32"), Proto: tu.ProtoICMP, Port: 7},
		state.AllowRule{Prefix: netip.MustParsePrefix("2001:db8:3::/120"), Proto: tu.ProtoICMPv6},
	)
}

// stampTolerance bounds how far a timestamp the program wrote may lie from
// the model's: the two read the clock at different moments, and may
// disagree on whether a refresh was due (RefreshGranularity).
const stampTolerance = uint64(bpf.RefreshGranularity + time.Second)

// diff holds one phase's program and model side by side.
type diff struct {
	name     string
	g        *generator
	h        *harness
	env      *bpf.Env
	counts   [bpf.StatsSlots]uint64
	asked    [2]int // the model's routing questions, answered false and true
	writes   map[bpf.FlowWrite]int
	fragsSet int
	fragsHit int
	unsure   int
	egressN  int
	refused  int
	marks    bool // the phase trusts the port marks
	cfg      state.Config
	silent   [bpf.StatsSlots]uint64 // frames counted while their kind's events were off
	lane     int                    // of those, session passes: the express lane's, but for any-protocol ones
	lastFrag *bpf.AegisFragKey
	events   *ringbuf.Reader
	emitted  [bpf.StatsSlots]int
}

func newDiff(t *testing.T, g *generator, ph diffPhase) *diff {
	h := newHarness(t)
	env := &bpf.Env{
		Now:        state.Now(),
		SessionsV4: map[bpf.AegisSessionKeyV4]*bpf.AegisSessionValue{},
		SessionsV6: map[bpf.AegisSessionKeyV6]*bpf.AegisSessionValue{},
		FlowsV4:    map[bpf.AegisFlowKeyV4]*bpf.AegisFlowValue{},
		FlowsV6:    map[bpf.AegisFlowKeyV6]*bpf.AegisFlowValue{},
		TombsV4:    map[bpf.AegisSessionKeyV4]*bpf.AegisTombValue{},
		TombsV6:    map[bpf.AegisSessionKeyV6]*bpf.AegisTombValue{},
		Frags:      map[bpf.AegisFragKey]*bpf.AegisFragValue{},
	}
	d := &diff{name: ph.name, g: g, h: h, env: env, writes: map[bpf.FlowWrite]int{}, marks: ph.marks}
	env.Local = func(a netip.Addr) bool {
		l := fibLocal(a)
		d.asked[b2i(l)]++
		return l
	}
	env.OnFragment(func(k bpf.AegisFragKey) { d.lastFrag = &k })
	var a4, a6 uint16
	if ph.allow {
		e := h.setAllowEntries(t, diffAllowRules()...)
		env.AllowV4, env.AllowV6 = e.V4, e.V6
		a4, a6 = uint16(len(e.V4)), uint16(len(e.V6))
	}
	// Flow timeouts of an hour: the only deadline a frame can meet during
	// the run is a fragment's.
	cfg := state.Config{
		Controller: ph.controller, ControllerPort: 443, GRPCPort: 50001,
		DefaultIdleTimeout: time.Hour, Monitor: ph.monitor,
		AllowV4Prefixes: a4, AllowV6Prefixes: a6, NoFlowTracking: !ph.flows,
		FlowIdleTCP: time.Hour, FlowIdleUDP: time.Hour, FlowIdleICMP: time.Hour,
		// Rates no phase can exhaust (a bucket starts with a second's
		// worth): every frame emits its event, and each is compared.
		EventDropRate: 65535,
	}
	if ph.passEvents {
		cfg.EventPassRate = 65535
	}
	d.cfg = cfg
	h.setConfig(t, cfg)
	env.Config, _ = cfg.Value()
	env.Ifindex = h.fib.Ifindex
	rd, err := ringbuf.NewReader(h.objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	d.events = rd
	g.grantSessions(t, h, env)
	g.seedFlows(t, h, env)
	if ph.marks {
		// What the control plane and the loader do: mark every port
		// there is a session or a flow at, then trust the marks.
		if _, err := h.maps.TrustSessionMarks(); err != nil {
			t.Fatal(err)
		}
		if err := state.TrustFlowMarks(h.objs.PortMarks, h.objs.FlowsV4, h.objs.FlowsV6); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func (d *diff) step(i int) error {
	if d.g.rng.IntN(4) == 0 {
		return d.egress(i)
	}
	return d.ingress(i)
}

func (d *diff) ingress(i int) error {
	h, env := d.h, d.env
	pkt := d.g.ingress()
	// The program's clock lags the user-space clock by up to a tick.
	t0 := state.Now() - uint64(state.Tick())
	got, err := h.fib.Run(h.prog, pkt)
	t1 := state.Now()
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}

	env.Now, env.Late, env.Ambiguous, d.lastFrag = t0, t1, false, nil
	env.Events = env.Events[:0]
	wantAction, want := bpf.Verdict(pkt, env)
	alt := want
	if env.Ambiguous {
		// A fragment whose datagram's memory expired while the program
		// ran: the program may have seen it either way. That path writes
		// nothing, so asking the model again at the later time is safe.
		env.Now, env.Late = t1, 0
		_, alt = bpf.Verdict(pkt, env)
		d.unsure++
	}
	counted := want
	if readCounter(h, want) != d.counts[want]+1 {
		if alt == want || readCounter(h, alt) != d.counts[alt]+1 {
			return fmt.Errorf("ingress frame %d: program action %d, model action %d reason %v (counters: %s)\n%s",
				i, got, wantAction, want, d.moved(h), hex.Dump(pkt))
		}
		counted = alt
	}
	if bpf.Action(got) != counted.Action() || !env.Ambiguous && bpf.Action(got) != wantAction {
		return fmt.Errorf("ingress frame %d: program action %d for reason %v\n%s", i, got, counted, hex.Dump(pkt))
	}
	d.counts[counted]++
	if counted == bpf.ReasonAllowlist {
		if err := d.compareAllowHits(); err != nil {
			return fmt.Errorf("ingress frame %d: %w\n%s", i, err, hex.Dump(pkt))
		}
	}
	if err := d.compareEvent(counted, t0, t1); err != nil {
		return fmt.Errorf("ingress frame %d: %w\n%s", i, err, hex.Dump(pkt))
	}
	if counted != bpf.ReasonFragment && counted != bpf.ReasonMonitor && isLaterFragment(pkt) {
		d.fragsHit++
	}

	if k := d.lastFrag; k != nil {
		// The model remembered a first fragment: the program must have,
		// with the same reason, and the model adopts its deadline.
		var v bpf.AegisFragValue
		if err := h.objs.Frags.Lookup(k, &v); err != nil {
			return fmt.Errorf("ingress frame %d: first fragment not remembered: %w\n%s", i, err, hex.Dump(pkt))
		}
		m := env.Frags[*k]
		lo, hi := t0+uint64(bpf.FragTimeout), t1+uint64(bpf.FragTimeout)
		if v.Reason != m.Reason || v.ExpiresNs < lo || v.ExpiresNs > hi {
			return fmt.Errorf("ingress frame %d: fragment remembered as %+v, model %+v in [%d, %d]", i, v, *m, lo, hi)
		}
		m.ExpiresNs = v.ExpiresNs
		d.fragsSet++
	}
	return nil
}

func (d *diff) egress(i int) error {
	h, env := d.h, d.env
	pkt := d.g.egressFrame()
	t0 := state.Now() - uint64(state.Tick())
	ret, err := h.egress.Run(&ebpf.RunOptions{Data: pkt})
	t1 := state.Now()
	if errors.Is(err, unix.EINVAL) && len(pkt) < 14+40 {
		// BPF_PROG_TEST_RUN refuses an skb shorter than the IP header its
		// EtherType announces; the stack never transmits one.
		d.refused++
		return nil
	}
	if err != nil {
		return fmt.Errorf("run egress: %w", err)
	}
	if int32(ret) != -1 { // TCX_NEXT: the egress program never decides
		return fmt.Errorf("egress frame %d: returned %d, want TCX_NEXT", i, int32(ret))
	}
	env.Now, env.Late = t0, 0
	w, key := bpf.Egress(pkt, env)
	d.writes[w]++
	if key != nil {
		d.g.noteFlow(key)
		if err := d.compareFlow(key, w, t0, t1); err != nil {
			return fmt.Errorf("egress frame %d (model: %v): %w\n%s", i, w, err, hex.Dump(pkt))
		}
	}
	if d.egressN++; d.egressN%64 == 0 {
		if err := d.compareFlows(); err != nil {
			return fmt.Errorf("after egress frame %d: %w\n%s", i, err, hex.Dump(pkt))
		}
	}
	return nil
}

// compareFlow checks the one entry an egress frame touched and adopts the
// program's timestamps into the model.
func (d *diff) compareFlow(key any, w bpf.FlowWrite, t0, t1 uint64) error {
	var kv bpf.AegisFlowValue
	var mv *bpf.AegisFlowValue
	var err error
	switch k := key.(type) {
	case bpf.AegisFlowKeyV4:
		err, mv = d.h.objs.FlowsV4.Lookup(&k, &kv), d.env.FlowsV4[k]
	case bpf.AegisFlowKeyV6:
		err, mv = d.h.objs.FlowsV6.Lookup(&k, &kv), d.env.FlowsV6[k]
	}
	if (err == nil) != (mv != nil) {
		return fmt.Errorf("flow %+v: in program %v, in model %v", key, err == nil, mv != nil)
	}
	if mv == nil {
		return nil
	}
	switch {
	case w == bpf.FlowCreated && (kv.CreatedNs < t0 || kv.CreatedNs > t1 || kv.LastSeenNs != kv.CreatedNs):
		return fmt.Errorf("flow %+v created with %+v, not at [%d, %d]", key, kv, t0, t1)
	case !near(kv.LastSeenNs, mv.LastSeenNs) || !near(kv.CreatedNs, mv.CreatedNs):
		return fmt.Errorf("flow %+v is %+v in the program, %+v in the model", key, kv, *mv)
	}
	*mv = kv
	return nil
}

func near(a, b uint64) bool { return a-b <= stampTolerance || b-a <= stampTolerance }

// compareFlows compares both flow tables whole and adopts the program's
// timestamps.
func (d *diff) compareFlows() error {
	err := errors.Join(
		compareTable(d.h.objs.FlowsV4, d.env.FlowsV4, flowNear),
		compareTable(d.h.objs.FlowsV6, d.env.FlowsV6, flowNear),
		compareTable(d.h.objs.TombsV4, d.env.TombsV4, tombNear),
		compareTable(d.h.objs.TombsV6, d.env.TombsV6, tombNear))
	return err
}

func flowNear(a, b *bpf.AegisFlowValue) bool {
	return near(a.LastSeenNs, b.LastSeenNs) && near(a.CreatedNs, b.CreatedNs)
}

// A tombstone's timestamps are the egress program's only writes to it;
// the rest is compared exactly.
func tombNear(a, b *bpf.AegisTombValue) bool {
	return near(a.LastSeenNs, b.LastSeenNs) && a.RemovedNs == b.RemovedNs && a.Cause == b.Cause
}

// compareTable compares a table of the program with the model's whole and
// adopts the program's values.
func compareTable[K comparable, V any](m *ebpf.Map, model map[K]*V, same func(a, b *V) bool) error {
	var k K
	var v V
	seen := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		mv := model[k]
		if mv == nil {
			return fmt.Errorf("%v: %+v in the program only", m, k)
		}
		if !same(&v, mv) {
			return fmt.Errorf("%v: %+v is %+v in the program, %+v in the model", m, k, v, *mv)
		}
		*mv = v
		seen++
	}
	if err := it.Err(); err != nil {
		return err
	}
	if seen != len(model) {
		return fmt.Errorf("%d entries in %v, %d in the model", seen, m, len(model))
	}
	return nil
}

func (d *diff) moved(h *harness) string {
	stats, err := h.maps.ReadStats()
	if err != nil {
		return err.Error()
	}
	s := ""
	for _, r := range bpf.Reasons {
		if stats[r].Packets != d.counts[r] {
			s += fmt.Sprintf(" %v %+d", r, int64(stats[r].Packets-d.counts[r]))
		}
	}
	return s
}

// finish checks every counter, both flow tables and the fragment table,
// and that the phase exercised what it is there to exercise.
func (d *diff) finish(t *testing.T) {
	t.Helper()
	stats, err := d.h.maps.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	for r := range stats {
		if stats[r].Packets != d.counts[r] {
			t.Fatalf("%s: reason %v counted %d, model %d", d.name, bpf.Reason(r), stats[r].Packets, d.counts[r])
		}
	}
	if err := d.compareFlows(); err != nil {
		t.Fatalf("%s: %v", d.name, err)
	}
	// The program marked the port of every flow it created (the seeded
	// ones the test marked): a flow at an unmarked port would not pass.
	if unmarked := unmarkedFlows(t, d.h); d.marks && unmarked != 0 {
		t.Fatalf("%s: %d flows at ports without their mark", d.name, unmarked)
	}
	// Every slot, so that a count on a path the model does not count on
	// (or in a slot it does not) shows.
	hits := 0
	for slot := range uint32(d.h.objs.AllowHits.MaxEntries()) {
		got, err := allowHits(d.h, slot)
		if err != nil {
			t.Fatal(err)
		}
		if want := d.env.AllowHits[slot]; got != want {
			t.Fatalf("%s: allow_hits slot %d counted %d, model %d", d.name, slot, got, want)
		}
		if got > 0 {
			hits++
		}
	}
	t.Logf("%s: allow rules hit %d", d.name, hits)
	if d.env.Config.AllowV4Rules != 0 && hits < 8 {
		t.Fatalf("%s: only %d allow rules hit", d.name, hits)
	}
	for r := range d.counts {
		if uint64(d.emitted[r])+d.silent[r] != d.counts[r] {
			t.Fatalf("%s: reason %v: %d events and %d frames without for %d frames",
				d.name, bpf.Reason(r), d.emitted[r], d.silent[r], d.counts[r])
		}
	}
	if d.lane < 1000 {
		t.Fatalf("%s: only %d session passes with pass events off: the express lane went untested", d.name, d.lane)
	}
	n := 0
	var k bpf.AegisFragKey
	var v bpf.AegisFragValue
	for it := d.h.objs.Frags.Iterate(); it.Next(&k, &v); n++ {
		if m := d.env.Frags[k]; m == nil || *m != v {
			t.Fatalf("%s: fragment %+v is %+v in the program, %v in the model", d.name, k, v, m)
		}
	}
	if n != len(d.env.Frags) {
		t.Fatalf("%s: %d fragments remembered, model %d", d.name, n, len(d.env.Frags))
	}
	if capacity := d.h.objs.Frags.MaxEntries(); uint32(n) >= capacity/2 {
		t.Fatalf("%s: %d fragments near the LRU map's %d: evictions would be compared", d.name, n, capacity)
	}

	for _, r := range bpf.Reasons {
		if d.counts[r] > 0 {
			t.Logf("%s: %-15v %6d", d.name, r, d.counts[r])
		}
	}
	t.Logf("%s: egress: %d none, %d kept, %d created, %d refused; flows %d+%d; %d short frames the kernel refused to run",
		d.name, d.writes[bpf.FlowNone], d.writes[bpf.FlowKept], d.writes[bpf.FlowCreated], d.writes[bpf.FlowRefused],
		len(d.env.FlowsV4), len(d.env.FlowsV6), d.refused)
	t.Logf("%s: fragments remembered %d, later fragments passed %d, fragment deadlines met mid-run %d",
		d.name, d.fragsSet, d.fragsHit, d.unsure)
	t.Logf("%s: local destinations %d, forwarded or dropping %d", d.name, d.asked[1], d.asked[0])

	// Both answers of the routing table, on both bypasses, often enough to
	// have met each kind of destination.
	if d.asked[0] < 150 || d.asked[1] < 150 || d.counts[bpf.ReasonNDP] < 300 {
		t.Fatalf("%s: the bypasses were barely exercised", d.name)
	}
	// In monitor mode every drop counts as monitor.
	dropped := func(r bpf.Reason) uint64 {
		if d.env.Config.Monitor != 0 {
			return d.counts[bpf.ReasonMonitor]
		}
		return d.counts[r]
	}
	if d.fragsSet < 200 || d.fragsHit < 100 || dropped(bpf.ReasonFragment) < 100 {
		t.Fatalf("%s: fragments were barely exercised", d.name)
	}
	if d.counts[bpf.ReasonSession] < 1000 || dropped(bpf.ReasonExpired) < 500 {
		t.Fatalf("%s: sessions were barely exercised", d.name)
	}
	if d.env.Config.TrackFlows == 0 {
		if d.counts[bpf.ReasonReply] != 0 || d.writes[bpf.FlowCreated] != 0 {
			t.Fatalf("%s: flows without flow tracking", d.name)
		}
		return
	}
	if d.counts[bpf.ReasonReply] < 1000 || d.counts[bpf.ReasonICMPRelated] < 300 ||
		d.writes[bpf.FlowCreated] < 500 || d.writes[bpf.FlowKept] < 500 || d.writes[bpf.FlowRefused] < 100 {
		t.Fatalf("%s: flows were barely exercised", d.name)
	}
}

// compareAllowHits compares the program's allow rule counters with the
// model's, for the slots the model has counted in.
func (d *diff) compareAllowHits() error {
	for slot, want := range d.env.AllowHits {
		got, err := allowHits(d.h, slot)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("allow_hits slot %d counted %d, model %d (%v)", slot, got, want, d.env.AllowHits)
		}
	}
	return nil
}

func allowHits(h *harness, slot uint32) (uint64, error) {
	var perCPU []uint64
	if err := h.objs.AllowHits.Lookup(slot, &perCPU); err != nil {
		return 0, fmt.Errorf("read allow_hits slot %d: %w", slot, err)
	}
	var n uint64
	for _, c := range perCPU {
		n += c
	}
	return n, nil
}

func isLaterFragment(pkt []byte) bool {
	_, r := bpf.Verdict(pkt, &bpf.Env{Frags: map[bpf.AegisFragKey]*bpf.AegisFragValue{}})
	return r == bpf.ReasonFragment
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func readCounter(h *harness, r bpf.Reason) uint64 {
	var perCPU []bpf.AegisStatsValue
	if err := h.maps.Stats.Lookup(uint32(r), &perCPU); err != nil {
		return ^uint64(0)
	}
	var n uint64
	for _, c := range perCPU {
		n += c.Packets
	}
	return n
}

// generator draws frames from small address and port pools, so that many
// of them hit sessions, flows, allow rules and the controller.
type generator struct {
	rng              *rand.Rand
	src4, dst4       []netip.Addr // the public side's addresses, the gateway's side's
	src6, dst6       []netip.Addr
	ctl4, ctl6       netip.Addr
	ports            []uint16 // services: sessions' ports
	ephemeral        []uint16 // clients' ports
	ids              []uint32 // IP identifications and echo identifiers
	sessionProtocols []uint8
	sessions4        []bpf.AegisSessionKeyV4
	sessions6        []bpf.AegisSessionKeyV6
	tombs4           []bpf.AegisSessionKeyV4 // tombstones: keys of removed sessions
	tombs6           []bpf.AegisSessionKeyV6
	flows4           []bpf.AegisFlowKeyV4 // every flow key seen, live or not
	flows6           []bpf.AegisFlowKeyV6
}

func newGenerator(rng *rand.Rand) *generator {
	g := &generator{
		rng:              rng,
		ctl4:             netip.MustParseAddr("198.51.100.5"),
		ctl6:             netip.MustParseAddr("2001:db8:2::5"),
		ports:            []uint16{22, 53, 443, 8080, 50001},
		ephemeral:        []uint16{40000, 40001, 51234},
		ids:              []uint32{1, 2, 0xBEEF},
		sessionProtocols: []uint8{tu.ProtoTCP, tu.ProtoUDP, 0},
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

func (g *generator) anyPort() uint16 {
	if g.rng.IntN(2) == 0 {
		return pick(g.rng, g.ports)
	}
	return pick(g.rng, g.ephemeral)
}

// grantSessions gives about half of the pool's (src, dst, port, protocol)
// combinations a session, any-protocol ones included, live or expired in
// each of the ways the data path checks, in both the program's maps and
// the model's. Timestamps are hours from any boundary, so the few seconds
// between the model's clock and the kernel's do not matter.
func (g *generator) grantSessions(t *testing.T, h *harness, env *bpf.Env) {
	now := env.Now
	g.sessions4, g.sessions6 = nil, nil
	g.tombs4, g.tombs6 = nil, nil
	for _, fam := range [][2][]netip.Addr{{g.src4, g.dst4}, {g.src6, g.dst6}} {
		for _, src := range fam[0] {
			for _, dst := range fam[1] {
				for _, port := range g.ports {
					for _, proto := range g.sessionProtocols {
						if !g.portHolds(port, proto) {
							continue
						}
						if g.rng.IntN(2) == 0 {
							if g.rng.IntN(2) == 0 {
								g.buryOne(t, h, env, src, dst, port, proto)
							}
							continue
						}
						v := bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}
						switch g.rng.IntN(5) {
						case 0: // idle past its own timeout
							v.LastSeenNs = now - uint64(2*time.Hour)
						case 1: // past its lifetime
							v.ExpiresNs = now - uint64(time.Hour)
						case 2: // live, lifetime ahead, stale enough to be refreshed
							v.ExpiresNs = now + uint64(time.Hour)
							v.LastSeenNs = now - uint64(10*time.Minute)
						case 3: // default idle timeout (1h), idle 2h
							v.IdleTimeoutNs = 0
							v.LastSeenNs = now - uint64(2*time.Hour)
						}
						if src.Is4() {
							k := bpf.AegisSessionKeyV4{Src: src.As4(), Dst: dst.As4(), Dport: port, Proto: proto}
							h.putSession(t, k, v)
							env.SessionsV4[k] = &v
							g.sessions4 = append(g.sessions4, k)
						} else {
							k := bpf.AegisSessionKeyV6{Src: src.As16(), Dst: dst.As16(), Dport: port, Proto: proto}
							h.putSession(t, k, v)
							env.SessionsV6[k] = &v
							g.sessions6 = append(g.sessions6, k)
						}
					}
				}
			}
		}
	}
}

// portHolds says which protocols' sessions a service port may have: some
// ports one protocol only, so that a port marked for another protocol than
// its sessions' shows.
func (g *generator) portHolds(port uint16, proto uint8) bool {
	switch port {
	case 22:
		return proto == tu.ProtoTCP
	case 53:
		return proto == tu.ProtoUDP
	case 50001:
		return proto == 0
	}
	return true
}

// buryOne gives a key without a session a tombstone: fresh, stale enough
// to be refreshed, or idle past its timeout (an hour, as flows').
func (g *generator) buryOne(t *testing.T, h *harness, env *bpf.Env, src, dst netip.Addr, port uint16, proto uint8) {
	now := env.Now
	v := bpf.AegisTombValue{LastSeenNs: now, RemovedNs: now - uint64(time.Hour), Cause: uint32(bpf.AegisTombCauseTOMB_REVOKED)}
	switch g.rng.IntN(3) {
	case 0:
		v.LastSeenNs = now - uint64(10*time.Minute)
	case 1:
		v.LastSeenNs = now - uint64(2*time.Hour)
	}
	if src.Is4() {
		k := bpf.AegisSessionKeyV4{Src: src.As4(), Dst: dst.As4(), Dport: port, Proto: proto}
		if err := h.objs.TombsV4.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
		env.TombsV4[k], g.tombs4 = &v, append(g.tombs4, k)
		return
	}
	k := bpf.AegisSessionKeyV6{Src: src.As16(), Dst: dst.As16(), Dport: port, Proto: proto}
	if err := h.objs.TombsV6.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	env.TombsV6[k], g.tombs6 = &v, append(g.tombs6, k)
}

// seedFlows puts flows into both tables: fresh, stale enough to be
// refreshed, and expired.
func (g *generator) seedFlows(t *testing.T, h *harness, env *bpf.Env) {
	now := env.Now
	g.flows4, g.flows6 = nil, nil
	for range 600 {
		v := bpf.AegisFlowValue{LastSeenNs: now, CreatedNs: now - uint64(3*time.Hour)}
		switch g.rng.IntN(3) {
		case 0:
			v.LastSeenNs = now - uint64(10*time.Minute)
		case 1:
			v.LastSeenNs = now - uint64(2*time.Hour)
		}
		proto := pick(g.rng, []uint8{tu.ProtoTCP, tu.ProtoUDP, tu.ProtoICMP})
		sport, dport := g.anyPort(), g.anyPort()
		if proto == tu.ProtoICMP {
			sport, dport = 0, uint16(pick(g.rng, g.ids))
		}
		if g.rng.IntN(2) == 0 {
			k := bpf.AegisFlowKeyV4{Src: pick(g.rng, g.src4).As4(), Dst: pick(g.rng, g.dst4).As4(), Sport: sport, Dport: dport, Proto: proto}
			if err := h.objs.FlowsV4.Put(&k, &v); err != nil {
				t.Fatal(err)
			}
			env.FlowsV4[k] = &v
		} else {
			if proto == tu.ProtoICMP {
				proto = tu.ProtoICMPv6
			}
			k := bpf.AegisFlowKeyV6{Src: pick(g.rng, g.src6).As16(), Dst: pick(g.rng, g.dst6).As16(), Sport: sport, Dport: dport, Proto: proto}
			if err := h.objs.FlowsV6.Put(&k, &v); err != nil {
				t.Fatal(err)
			}
			env.FlowsV6[k] = &v
		}
	}
	for k := range env.FlowsV4 {
		g.flows4 = append(g.flows4, k)
	}
	for k := range env.FlowsV6 {
		g.flows6 = append(g.flows6, k)
	}
}

func (g *generator) noteFlow(key any) {
	switch k := key.(type) {
	case bpf.AegisFlowKeyV4:
		g.flows4 = append(g.flows4, k)
	case bpf.AegisFlowKeyV6:
		g.flows6 = append(g.flows6, k)
	}
}

// tuple is a packet's addresses, ports and protocol, for the generators.
type tuple struct {
	src, dst     netip.Addr
	sport, dport uint16
	proto        uint8
}

func icmpOf(a netip.Addr) uint8 {
	if a.Is4() {
		return tu.ProtoICMP
	}
	return tu.ProtoICMPv6
}

// aFlow is the reply tuple of a known flow (proto 1/58: sport 0, dport the
// echo identifier).
func (g *generator) aFlow(v4 bool) tuple {
	if v4 && len(g.flows4) > 0 {
		k := pick(g.rng, g.flows4)
		return tuple{netip.AddrFrom4(k.Src), netip.AddrFrom4(k.Dst), k.Sport, k.Dport, k.Proto}
	}
	k := pick(g.rng, g.flows6)
	return tuple{netip.AddrFrom16(k.Src), netip.AddrFrom16(k.Dst), k.Sport, k.Dport, k.Proto}
}

// aSession is a session's key as an inbound tuple; an any-protocol one
// gets TCP or UDP.
func (g *generator) aSession(v4 bool) tuple {
	var t tuple
	if v4 {
		k := pick(g.rng, g.sessions4)
		t = tuple{netip.AddrFrom4(k.Src), netip.AddrFrom4(k.Dst), g.anyPort(), k.Dport, k.Proto}
	} else {
		k := pick(g.rng, g.sessions6)
		t = tuple{netip.AddrFrom16(k.Src), netip.AddrFrom16(k.Dst), g.anyPort(), k.Dport, k.Proto}
	}
	if t.proto == 0 {
		t.proto = pick(g.rng, []uint8{tu.ProtoTCP, tu.ProtoUDP})
	}
	return t
}

// aTomb is a tombstone's key as an inbound tuple, as aSession.
func (g *generator) aTomb(v4 bool) tuple {
	var t tuple
	if v4 && len(g.tombs4) > 0 {
		k := pick(g.rng, g.tombs4)
		t = tuple{netip.AddrFrom4(k.Src), netip.AddrFrom4(k.Dst), g.anyPort(), k.Dport, k.Proto}
	} else {
		k := pick(g.rng, g.tombs6)
		t = tuple{netip.AddrFrom16(k.Src), netip.AddrFrom16(k.Dst), g.anyPort(), k.Dport, k.Proto}
	}
	if t.proto == 0 {
		t.proto = pick(g.rng, []uint8{tu.ProtoTCP, tu.ProtoUDP})
	}
	return t
}

// aTuple is an inbound tuple from the pools.
func (g *generator) aTuple(v4 bool) tuple {
	t := tuple{sport: g.anyPort(), dport: g.anyPort(), proto: pick(g.rng, []uint8{tu.ProtoTCP, tu.ProtoUDP})}
	if v4 {
		t.src, t.dst = pick(g.rng, g.src4), pick(g.rng, g.dst4)
	} else {
		t.src, t.dst = pick(g.rng, g.src6), pick(g.rng, g.dst6)
	}
	return t
}

// packet builds t as a frame; ICMP tuples become echo replies (inbound
// orientation: the identifier is dport) unless request is set.
func (g *generator) packet(t tuple, request bool) pkt {
	p := pkt{Frame: tu.Frame{Src: t.src, Dst: t.dst, Proto: t.proto, SrcPort: t.sport, DstPort: t.dport, Payload: g.rng.IntN(24)}}
	p.TCPFlags = pick(g.rng, []uint8{0x02, 0x12, 0x10, 0x18, 0x04, 0x11, 0xC2})
	if t.proto == tu.ProtoICMP || t.proto == tu.ProtoICMPv6 {
		p.ICMPType, p.EchoID = 0, t.dport
		if t.src.Is6() {
			p.ICMPType = 129
		}
		if request {
			p.ICMPType, p.EchoID = 8, t.sport
			if t.src.Is6() {
				p.ICMPType = 128
			}
		}
	}
	p.HopLimit = 64
	p.IPID = pick(g.rng, g.ids)
	g.decorate(&p)
	return p
}

// decorate adds VLAN tags, IPv4 options or IPv6 extension headers now and
// then.
func (g *generator) decorate(p *pkt) {
	switch g.rng.IntN(8) {
	case 0:
		p.VLANs = []uint16{0x8100}
	case 1:
		p.VLANs = []uint16{0x88A8, 0x8100}
	}
	if g.rng.IntN(6) == 0 {
		if p.Src.Is4() {
			p.IPv4Options = 4 * (1 + g.rng.IntN(10))
		} else {
			p.IPv6Ext = []uint8{pick(g.rng, []uint8{0, 60, 43})}
		}
	}
}

// ingress is one frame arriving on the public interface.
func (g *generator) ingress() []byte {
	v4 := g.rng.IntN(2) == 0
	switch n := g.rng.IntN(20); {
	case n < 13:
		return g.frame()
	case n < 15: // a reply to a known flow, or nearly one
		t := g.aFlow(v4)
		switch g.rng.IntN(6) {
		case 0:
			t.sport++
		case 1:
			t.dport = g.anyPort()
		}
		return g.packet(t, false).Bytes()
	case n < 17:
		return g.icmpError(v4)
	case n < 19:
		return g.fragment(v4)
	default: // echo requests and replies from the pools
		t := g.aTuple(v4)
		t.proto = icmpOf(t.src)
		t.sport, t.dport = uint16(pick(g.rng, g.ids)), uint16(pick(g.rng, g.ids))
		return g.packet(t, g.rng.IntN(2) == 0).Bytes()
	}
}

// icmpError is an ICMP error quoting a packet this side sent: one of a
// known flow, one of a session's service, or anything.
func (g *generator) icmpError(v4 bool) []byte {
	var sent tuple // outbound orientation
	request := false
	switch g.rng.IntN(3) {
	case 0:
		r := g.aFlow(v4)
		sent = tuple{r.dst, r.src, r.dport, r.sport, r.proto}
		if r.proto == tu.ProtoICMP || r.proto == tu.ProtoICMPv6 {
			sent.sport, sent.dport, request = r.dport, 0, true
		}
	case 1:
		s := g.aSession(v4)
		sent = tuple{s.dst, s.src, s.dport, s.sport, s.proto}
	default:
		s := g.aTuple(v4)
		sent = tuple{s.dst, s.src, s.sport, s.dport, pick(g.rng, []uint8{tu.ProtoTCP, tu.ProtoUDP, icmpOf(s.src), tu.ProtoSCTP})}
		request = g.rng.IntN(3) != 0
	}
	inner := pkt{Frame: tu.Frame{Src: sent.src, Dst: sent.dst, Proto: sent.proto, SrcPort: sent.sport, DstPort: sent.dport, Payload: 16}}
	if sent.proto == tu.ProtoICMP || sent.proto == tu.ProtoICMPv6 {
		inner.ICMPType, inner.EchoID = pick(g.rng, []uint8{8, 0, 13}), sent.sport
		if sent.src.Is6() {
			inner.ICMPType = pick(g.rng, []uint8{128, 129, 1})
		}
		if request {
			inner.ICMPType = map[bool]uint8{true: 8, false: 128}[sent.src.Is4()]
		}
	}
	switch g.rng.IntN(10) {
	case 0:
		if inner.Src.Is4() {
			inner.IPv4Options = 4 * (1 + g.rng.IntN(10))
		} else {
			inner.IPv6Ext = []uint8{60} // unmatchable
		}
	case 1:
		inner.FragOffset = 1 + uint16(g.rng.IntN(50)) // a later fragment: unmatchable
	}
	n := 8 + g.rng.IntN(24)
	if g.rng.IntN(8) == 0 {
		n = g.rng.IntN(8) // truncated
	}
	q := quoteOf(inner, n)
	if g.rng.IntN(8) == 0 {
		q = q[:g.rng.IntN(len(q))] // truncated anywhere
	}
	if g.rng.IntN(20) == 0 && len(q) > 0 {
		q[0] ^= 0x20 // another IP version
	}

	outer := pkt{Frame: tu.Frame{Src: pick(g.rng, append(g.src4, g.dst4...)), Dst: sent.src, Proto: tu.ProtoICMP}, Quote: q}
	outer.ICMPType = pick(g.rng, []uint8{3, 11, 12, 3, 11, 12, 4, 5, 0})
	if !v4 {
		outer.Src, outer.Proto = pick(g.rng, append(g.src6, g.dst6...)), tu.ProtoICMPv6
		outer.ICMPType = pick(g.rng, []uint8{1, 2, 3, 4, 1, 2, 3, 4, 129, 143})
	}
	outer.ICMPCode = uint8(g.rng.IntN(5))
	if g.rng.IntN(6) == 0 { // addressed to someone else than the quoted sender
		outer.Dst = pick(g.rng, map[bool][]netip.Addr{true: g.dst4, false: g.dst6}[v4])
	}
	if outer.Src.Is4() != outer.Dst.Is4() {
		outer.Src = outer.Dst
	}
	g.decorate(&outer)
	return outer.Bytes()
}

// fragment is a first or a later fragment of a datagram of a session, a
// flow or anything, with an identification from a small pool so that
// later fragments often belong to a remembered first fragment.
func (g *generator) fragment(v4 bool) []byte {
	var t tuple
	switch g.rng.IntN(3) {
	case 0:
		t = g.aSession(v4)
	case 1:
		t = g.aFlow(v4)
	default:
		t = g.aTuple(v4)
	}
	p := g.packet(t, false)
	p.VLANs, p.IPv4Options = nil, 0
	if g.rng.IntN(3) == 0 {
		p.FragOffset = 0 // first
		p.MoreFragments = true
	} else {
		p.FragOffset = 1 + uint16(g.rng.IntN(180))
		p.MoreFragments = g.rng.IntN(2) == 0
	}
	if !v4 {
		p.IPv6Ext = pick(g.rng, [][]uint8{{44}, {44}, {0, 44}, {44, 60}})
	}
	return p.Bytes()
}

// egressFrame is one frame leaving through the public interface.
func (g *generator) egressFrame() []byte {
	rng := g.rng
	if rng.IntN(30) == 0 {
		b := make([]byte, 14+rng.IntN(100))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		b[12], b[13] = pick(rng, []byte{0x08, 0x86, 0x81}), pick(rng, []byte{0x00, 0xDD})
		return b
	}
	v4 := rng.IntN(2) == 0
	var out tuple
	request := false
	switch n := rng.IntN(10); {
	case n < 3: // a packet of a known flow
		r := g.aFlow(v4)
		out = tuple{r.dst, r.src, r.dport, r.sport, r.proto}
		if r.proto == tu.ProtoICMP || r.proto == tu.ProtoICMPv6 {
			out.sport, out.dport, request = r.dport, 0, true
		}
	case n < 5: // a session's service answering its user
		s := g.aSession(v4)
		out = tuple{s.dst, s.src, s.dport, s.sport, s.proto}
	case n < 6: // a removed session's service still sending to its user
		s := g.aTomb(v4)
		out = tuple{s.dst, s.src, s.dport, s.sport, s.proto}
	default: // anything from the gateway's side to the public side
		s := g.aTuple(v4)
		out = tuple{s.dst, s.src, s.sport, s.dport, s.proto}
		switch rng.IntN(10) {
		case 0, 1:
			out.proto, request = icmpOf(out.src), rng.IntN(4) != 0
			out.sport, out.dport = uint16(pick(rng, g.ids)), uint16(pick(rng, g.ids))
		case 2:
			out.proto = pick(rng, []uint8{tu.ProtoSCTP, 47})
		}
	}
	p := g.packet(tuple{out.src, out.dst, out.sport, out.dport, out.proto}, request)
	if out.proto == icmpOf(out.src) && !request && rng.IntN(2) == 0 {
		p.ICMPType = pick(rng, []uint8{3, 1, 11}) // an error this side sends
	}
	if rng.IntN(10) == 0 {
		p.FragOffset = uint16(rng.IntN(2) * (1 + rng.IntN(100)))
		p.MoreFragments = true
		if !v4 {
			p.IPv6Ext = []uint8{44}
		}
	}
	b := p.Bytes()
	switch n := rng.IntN(20); {
	case n == 0:
		b = b[:14+rng.IntN(len(b)-13)]
	case n == 1:
		b[rng.IntN(min(len(b), 14+8+40+40))] = byte(rng.Uint32())
	}
	return b
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
		f.ICMPType = pick(rng, []uint8{0, 3, 5, 8, 11, 12, 13})
		if f.Src.Is6() {
			f.Proto = tu.ProtoICMPv6
			f.ICMPType = uint8(128 + rng.IntN(12))
			if rng.IntN(2) == 0 {
				f.ICMPType = uint8(133 + rng.IntN(5)) // neighbour discovery
			}
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
	f.SrcPort = g.anyPort()
	if rng.IntN(4) == 0 {
		f.SrcPort = uint16(rng.Uint32())
	}
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
	p := pkt{Frame: f, IPID: pick(rng, g.ids), EchoID: uint16(pick(rng, g.ids)),
		TCPFlags: pick(rng, []uint8{0x02, 0x12, 0x10})}
	b := p.Bytes()

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

// compareEvent reads the one event the program emitted for the frame just
// run and requires the model's event for the reason counted, with the
// program's timestamp inside the run.
func (d *diff) compareEvent(counted bpf.Reason, t0, t1 uint64) error {
	var want *bpf.AegisEvent
	for i := range d.env.Events {
		if bpf.Reason(d.env.Events[i].Reason) == counted {
			want = &d.env.Events[i]
		}
	}
	if want == nil {
		if bpf.EventRate(&d.env.Config, eventKindOf(counted)) != 0 {
			return fmt.Errorf("model emitted no event for reason %v: %+v", counted, d.env.Events)
		}
		// That kind's events are off: the program must emit none either.
		if n := d.events.AvailableBytes(); n != 0 {
			return fmt.Errorf("%d bytes of events for a reason (%v) whose events are off", n, counted)
		}
		d.silent[counted]++
		if counted == bpf.ReasonSession {
			d.lane++
		}
		return nil
	}
	d.events.SetDeadline(time.Now().Add(time.Second))
	rec, err := d.events.Read()
	if err != nil {
		return fmt.Errorf("read event: %w", err)
	}
	got, err := bpf.DecodeEvent(rec.RawSample)
	if err != nil {
		return err
	}
	if got.TsNs < t0 || got.TsNs > t1 {
		return fmt.Errorf("event stamped %d, outside the run [%d, %d]", got.TsNs, t0, t1)
	}
	w := *want
	w.TsNs = got.TsNs
	if got != w {
		return fmt.Errorf("event\n%+v\nmodel\n%+v", got, w)
	}
	if n := d.events.AvailableBytes(); n != 0 {
		return fmt.Errorf("%d bytes of further events after one frame", n)
	}
	d.emitted[counted]++
	return nil
}

// togglePassEvents turns pass events the other way, in the program's
// config and in the model's.
func (d *diff) togglePassEvents(t *testing.T) {
	t.Helper()
	d.cfg.EventPassRate = 65535 - d.cfg.EventPassRate
	d.h.setConfig(t, d.cfg)
	d.env.Config, _ = d.cfg.Value()
}

// eventKindOf is the bucket a counted reason's event draws on: the
// reason is the frame's cause unless it is monitor's would-be drop.
func eventKindOf(counted bpf.Reason) bpf.EventKind {
	if counted == bpf.ReasonMonitor {
		return bpf.EventKindDrop
	}
	return bpf.EventKindOf(counted, counted, counted.Action())
}

// unmarkedFlows counts the flows whose reply port has no flow mark.
func unmarkedFlows(t *testing.T, h *harness) int {
	t.Helper()
	marked := func(port uint16) bool {
		var v uint32
		if err := h.objs.PortMarks.Lookup(uint32(bpf.AegisMarkSlotMARK_FLOW)+uint32(port), &v); err != nil {
			t.Fatal(err)
		}
		return v != 0
	}
	n := 0
	var k4 bpf.AegisFlowKeyV4
	var k6 bpf.AegisFlowKeyV6
	var v bpf.AegisFlowValue
	for it := h.objs.FlowsV4.Iterate(); it.Next(&k4, &v); {
		n += b2i(!marked(k4.Dport))
	}
	for it := h.objs.FlowsV6.Iterate(); it.Next(&k6, &v); {
		n += b2i(!marked(k6.Dport))
	}
	return n
}
