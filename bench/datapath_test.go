// Package bench holds the benchmarks behind BENCHMARKS.md. Each measures
// Aegis beside its baselines in the same run, and reports medians and the
// ratios the targets are stated in. Run them with `make bench`.
package bench

import (
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"

	"github.com/aegis-agent/aegis/bench/reference"
	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

const (
	xdpRounds = 11
	xdpRepeat = 1_000_000
)

// measure runs prog on pkt xdpRepeat times in one BPF_PROG_TEST_RUN and
// returns the kernel's own time per run. The kernel stops its timer while
// the loop yields the CPU, so unlike wall time this is not inflated by
// other work on the machine; it does include the loop's per-iteration
// cost, which the floor program measures. The kernel reports whole
// nanoseconds.
func measure(b *testing.B, prog *ebpf.Program, pkt []byte, want bpf.Action) float64 {
	b.Helper()
	ret, per, err := prog.Benchmark(pkt, xdpRepeat, nil)
	if err != nil {
		b.Fatal(err)
	}
	if bpf.Action(ret) != want {
		b.Fatalf("%v returned %d, want %d", prog, ret, want)
	}
	return float64(per.Nanoseconds())
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// floorProgram loads the empty program, XDP_DROP and nothing else: the
// cost of running any program at all, which every ratio subtracts.
func floorProgram(b *testing.B) *ebpf.Program {
	b.Helper()
	floor, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, int32(bpf.XDPDrop)), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { floor.Close() })
	return floor
}

// aegisProgram loads the data path with unpinned maps of the given
// capacity, one allow rule and a config, and returns it with its maps and
// its IPv4 flow table.
func aegisProgram(b *testing.B, capacity uint32) (*ebpf.Program, *state.Maps, *ebpf.Map) {
	b.Helper()
	spec, err := bpf.Spec()
	if err != nil {
		b.Fatal(err)
	}
	return aegisProgramOf(b, spec, capacity)
}

// aegisProgramOf is aegisProgram for a build's spec, prepared with
// bpf.DirectConfig.
func aegisProgramOf(b *testing.B, spec *ebpf.CollectionSpec, capacity uint32) (*ebpf.Program, *state.Maps, *ebpf.Map) {
	b.Helper()
	spec.Maps[state.MapSessionsV4].MaxEntries = capacity
	spec.Maps[state.MapSessionsV6].MaxEntries = capacity
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { objs.Close() })
	maps := &state.Maps{SessionsV4: objs.SessionsV4, SessionsV6: objs.SessionsV6, AllowV4: objs.AllowV4,
		AllowV6: objs.AllowV6, Config: objs.Config, Stats: objs.Stats, SweepSeq: objs.SweepSeq,
		Events: objs.Events, EventLimits: objs.EventLimits, AllowHits: objs.AllowHits,
		FlowsV4: objs.FlowsV4, FlowsV6: objs.FlowsV6,
		TombsV4: objs.TombsV4, TombsV6: objs.TombsV6, PortMarks: objs.PortMarks}

	rule, _ := state.ParseAllowRule("203.0.113.0/24,tcp/22")
	entries, err := state.CompileAllow([]state.AllowRule{rule})
	if err != nil {
		b.Fatal(err)
	}
	for k, v := range entries.V4 {
		if err := maps.AllowV4.Put(&k, &v); err != nil {
			b.Fatal(err)
		}
	}
	cfg := state.Config{Controller: netip.MustParseAddr("198.51.100.5"), ControllerPort: 443, GRPCPort: 50001,
		DefaultIdleTimeout: time.Minute, AllowV4Prefixes: uint16(len(entries.V4))}
	v, _ := cfg.Value()
	if err := maps.Config.Put(uint32(0), &v); err != nil {
		b.Fatal(err)
	}
	return objs.AegisXdp, maps, objs.FlowsV4
}

func trustMarks(b *testing.B, m *state.Maps) {
	b.Helper()
	if _, err := m.TrustSessionMarks(); err != nil {
		b.Fatal(err)
	}
	if err := state.TrustFlowMarks(m.PortMarks, m.FlowsV4, m.FlowsV6); err != nil {
		b.Fatal(err)
	}
}

func grant(b *testing.B, m *state.Maps, k state.Key) {
	b.Helper()
	now := state.Now()
	if err := m.Grant(state.Session{Key: k, User: "bench", LastSeen: now, Created: now, IdleTimeout: time.Hour}); err != nil {
		b.Fatal(err)
	}
}

// fillSessions inserts n distinct IPv4 sessions with batch updates.
func fillSessions(b *testing.B, m *ebpf.Map, n int) {
	b.Helper()
	const chunk = 65536
	keys := make([]bpf.AegisSessionKeyV4, 0, chunk)
	vals := make([]bpf.AegisSessionValue, chunk)
	now := state.Now()
	for i := range vals {
		vals[i] = bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}
	}
	flush := func() {
		if _, err := m.BatchUpdate(keys, vals[:len(keys)], nil); err != nil {
			b.Fatalf("fill: %v", err)
		}
		keys = keys[:0]
	}
	for i := range n {
		// 10.0.0.0/8 sources: never the benchmark packet's.
		keys = append(keys, bpf.AegisSessionKeyV4{
			Src: [4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}, Dst: [4]byte{198, 51, 100, 10},
			Dport: 8080, Proto: 6,
		})
		if len(keys) == chunk {
			flush()
		}
	}
	if len(keys) > 0 {
		flush()
	}
}

// referenceProgram loads the least-work anchor (bench/reference) with the
// hit packet's key in its one map.
func referenceProgram(b *testing.B, src, dst netip.Addr, port uint16) *ebpf.Program {
	b.Helper()
	var objs reference.ReferenceObjects
	if err := reference.LoadReferenceObjects(&objs, nil); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { objs.Close() })
	k := reference.ReferenceKey{Src: src.As4(), Dst: dst.As4(), Dport: port, Proto: tu.ProtoTCP}
	if err := objs.Sessions.Put(&k, uint64(1)); err != nil {
		b.Fatal(err)
	}
	return objs.ReferenceXdp
}

// icmpError is an ICMP destination unreachable from router to the quoted
// packet's source, quoting its IP header and 8 bytes.
func icmpError(router netip.Addr, quoted tu.Frame) []byte {
	inner := quoted.Bytes()[14:]
	inner = inner[:20+8]
	pkt := tu.Frame{Src: router, Dst: quoted.Src, Proto: tu.ProtoICMP, ICMPType: 3, ICMPCode: 3, Payload: len(inner)}.Bytes()
	copy(pkt[14+20+8:], inner)
	return pkt
}

// xdpFilter loads Debian's xdp-filter on a veth in a fresh namespace (the
// program only, without libxdp's dispatcher) with policy allow and one
// port rule, and returns the loaded program.
func xdpFilter(b *testing.B) *ebpf.Program {
	b.Helper()
	if _, err := exec.LookPath("xdp-filter"); err != nil {
		b.Fatal("xdp-filter not installed (Debian package xdp-tools; make setup installs it)")
	}
	ns := tu.NewNetns(b, "aegis-bench-")
	ns.AddVeth(b, "xf0", "xf1")
	load := ns.Command("xdp-filter", "load", "-p", "allow", "xf0")
	load.Env = append(load.Environ(), "LIBXDP_SKIP_DISPATCHER=1")
	if out, err := load.CombinedOutput(); err != nil {
		b.Fatalf("xdp-filter load: %v\n%s", err, out)
	}
	b.Cleanup(func() { _ = ns.Command("xdp-filter", "unload", "xf0").Run() })
	ns.Run(b, "xdp-filter", "port", "8080")

	var id uint32
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName("xf0")
		if err != nil {
			return err
		}
		if x := l.Attrs().Xdp; x != nil {
			id = x.ProgId
		}
		return nil
	}); err != nil || id == 0 {
		b.Fatalf("find xdp-filter's program: %v", err)
	}
	prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { prog.Close() })
	if info, err := prog.Info(); err != nil || !strings.HasPrefix(info.Name, "xdpfilt") {
		b.Fatalf("program %d on xf0 is not xdp-filter's: %v %v", id, info, err)
	}
	return prog
}

// BenchmarkDataPath measures ns/packet through BPF_PROG_TEST_RUN for the
// data path's paths beside three baselines on the same packets: an empty
// XDP_DROP program (the floor), the least work a session filter can do
// (bench/reference: Ethernet, IPv4, TCP, one lookup) and Debian's
// xdp-filter. Cases run interleaved, xdpRounds times, and the medians are
// reported.
//
//	go test -run '^$' -bench DataPath -benchtime 1x ./bench/
func BenchmarkDataPath(b *testing.B) {
	tu.RequireKernel(b)
	floor := floorProgram(b)
	filter := xdpFilter(b)

	client4, svc4 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.10")
	client6, svc6 := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:2::10")
	tcp := func(src, dst netip.Addr, port uint16) []byte {
		return tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: port}.Bytes()
	}
	v4Hit := tcp(client4, svc4, 8080)
	v4Miss := tcp(client4, svc4, 8081)
	v6Hit := tcp(client6, svc6, 8080)

	small, smallMaps, smallFlows := aegisProgram(b, 1024)
	grant(b, smallMaps, state.Key{Src: client4, Dst: svc4, Port: 8080, Proto: state.TCP})
	grant(b, smallMaps, state.Key{Src: client6, Dst: svc6, Port: 8080, Proto: state.TCP})
	ref := referenceProgram(b, client4, svc4, 8080)

	// An any-protocol session (the exact lookup misses first), a flow the
	// gateway opened to a peer, and an ICMP error about a session's packet.
	now := state.Now()
	anyKey := bpf.AegisSessionKeyV4{Src: client4.As4(), Dst: svc4.As4(), Dport: 8090}
	if err := smallMaps.SessionsV4.Put(&anyKey, &bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}); err != nil {
		b.Fatal(err)
	}
	peer4 := netip.MustParseAddr("203.0.113.53")
	flowKey := bpf.AegisFlowKeyV4{Src: peer4.As4(), Dst: svc4.As4(), Sport: 443, Dport: 45000, Proto: tu.ProtoTCP}
	if err := smallFlows.Put(&flowKey, &bpf.AegisFlowValue{LastSeenNs: now, CreatedNs: now}); err != nil {
		b.Fatal(err)
	}
	replyPkt := tu.Frame{Src: peer4, Dst: svc4, Proto: tu.ProtoTCP, SrcPort: 443, DstPort: 45000}.Bytes()
	relatedPkt := icmpError(netip.MustParseAddr("198.51.100.254"),
		tu.Frame{Src: svc4, Dst: client4, Proto: tu.ProtoTCP, SrcPort: 8080, DstPort: 40000})

	// The port marks as the daemons leave them: every session's port marked
	// (the control plane), and every flow's (the loader, after a load).
	trustMarks(b, smallMaps)

	big, bigMaps, _ := aegisProgram(b, 1<<20)
	fillSessions(b, bigMaps.SessionsV4, 1_000_000-1)
	grant(b, bigMaps, state.Key{Src: client4, Dst: svc4, Port: 8080, Proto: state.TCP})
	trustMarks(b, bigMaps)
	if n, err := state.CountEntries(bigMaps.SessionsV4); err != nil || n != 1_000_000 {
		b.Fatalf("%d sessions loaded, want 1,000,000 (%v)", n, err)
	}

	cases := []struct {
		name string
		prog *ebpf.Program
		pkt  []byte
		want bpf.Action
	}{
		{"floor", floor, v4Hit, bpf.XDPDrop},
		{"reference", ref, v4Hit, bpf.XDPPass},
		{"xdpfilter-v4", filter, v4Miss, bpf.XDPPass}, // no rule for 8081: all lookups, then pass
		{"xdpfilter-v4-rule", filter, v4Hit, bpf.XDPDrop},
		{"xdpfilter-v6", filter, tcp(client6, svc6, 8081), bpf.XDPPass},
		{"miss", small, v4Miss, bpf.XDPDrop},
		// Another user's packet to the service's port, which a session is
		// for: the port marks cannot rule out the exact lookup.
		{"miss-service-port", small, tcp(netip.MustParseAddr("192.0.2.99"), svc4, 8080), bpf.XDPDrop},
		{"hit", small, v4Hit, bpf.XDPPass},
		{"hit-v6", small, v6Hit, bpf.XDPPass},
		{"hit-1M", big, v4Hit, bpf.XDPPass},
		{"any-proto-hit", small, tcp(client4, svc4, 8090), bpf.XDPPass},
		{"reply", small, replyPkt, bpf.XDPPass},
		// An allow rule: the LPM lookup and the rule's hit counter.
		{"allow", small, tcp(netip.MustParseAddr("203.0.113.9"), svc4, 22), bpf.XDPPass},
		{"icmp-related", small, relatedPkt, bpf.XDPPass},
	}
	samples := make(map[string][]float64)
	for range xdpRounds {
		for _, c := range cases {
			samples[c.name] = append(samples[c.name], measure(b, c.prog, c.pkt, c.want))
		}
	}
	med := make(map[string]float64)
	for _, c := range cases {
		med[c.name] = median(samples[c.name])
		b.ReportMetric(med[c.name], c.name+"-ns/pkt")
	}
	b.ReportMetric(med["miss"]-med["floor"], "miss-over-floor-ns")
	b.ReportMetric(med["hit"]-med["floor"], "hit-over-floor-ns")
	b.ReportMetric(med["hit-1M"]/med["hit"], "hit-1M/hit")
	b.ReportMetric(med["hit"]-med["reference"], "hit-over-reference-ns")

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-20s %10s %12s %16s\n", "case", "ns/pkt", "over floor", "over reference")
	for _, c := range cases {
		fmt.Fprintf(&sb, "%-20s %10.1f %12.1f %16.1f\n", c.name, med[c.name], med[c.name]-med["floor"], med[c.name]-med["reference"])
	}
	check := func(ok bool, s string, args ...any) {
		mark := "met"
		if !ok {
			mark = "MISSED"
		}
		fmt.Fprintf(&sb, "target %-45s %s\n", fmt.Sprintf(s, args...), mark)
	}
	check(med["miss"] <= med["floor"]+30, "miss <= floor + 30 ns (%.1f)", med["miss"]-med["floor"])
	check(med["hit"] <= med["floor"]+30, "hit <= floor + 30 ns (%.1f)", med["hit"]-med["floor"])
	check(med["hit-1M"] <= 1.3*med["hit"], "hit-1M <= 1.3 x hit (%.2f)", med["hit-1M"]/med["hit"])
	check(med["miss"] < med["xdpfilter-v4"] && med["hit"] < med["xdpfilter-v4"], "miss and hit below xdp-filter (%.1f)", med["xdpfilter-v4"])
	// Cost over the floor, against the reference's.
	refCost := med["reference"] - med["floor"]
	ratio := func(name string) float64 { return (med[name] - med["floor"]) / refCost }
	check(ratio("hit") <= 1.2, "hit <= 1.2 x reference (%.2f)", ratio("hit"))
	for _, name := range []string{"miss", "miss-service-port", "any-proto-hit", "reply", "icmp-related"} {
		check(ratio(name) <= 2, "%s <= 2 x reference (%.2f)", name, ratio(name))
	}
	for _, name := range []string{"miss", "miss-service-port", "hit", "any-proto-hit", "reply", "icmp-related"} {
		check(med[name] < med["xdpfilter-v4"], "%s below xdp-filter (%.2f x)", name, med[name]/med["xdpfilter-v4"])
	}
	b.Log(sb.String())
}
