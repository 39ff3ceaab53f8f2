package bpf_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// BenchmarkEgress measures ns/packet of aegis_egress through
// BPF_PROG_TEST_RUN on the paths a packet can take, to show where the
// tombstone lookups cost and where they do not: a packet of a live flow
// (every packet after a flow's first) never reaches them; a reply of a
// session stops before them; a reply of a removed session ends at them;
// a packet that an allow rule already admits pays both misses, as a new
// flow's first packet does. Cases run interleaved, and the medians of
// several rounds are reported.
//
//	go test -run '^$' -bench Egress -benchtime 1x ./bpf/
func BenchmarkEgress(b *testing.B) {
	h := newHarness(b)
	mgmt := netip.MustParseAddr("203.0.113.7")
	a4, a6 := h.setAllowRules(b, state.AllowRule{Prefix: netip.PrefixFrom(mgmt, 32), Proto: tu.ProtoUDP})
	h.setConfig(b, state.Config{DefaultIdleTimeout: time.Hour, AllowV4Prefixes: a4, AllowV6Prefixes: a6,
		FlowIdleTCP: time.Hour, FlowIdleUDP: time.Hour, FlowIdleICMP: time.Hour})
	user, svc, peer := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.10"), netip.MustParseAddr("203.0.113.53")
	now := state.Now()
	v := bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}
	h.putSession(b, bpf.AegisSessionKeyV4{Src: user.As4(), Dst: svc.As4(), Dport: 5000, Proto: tu.ProtoUDP}, v)
	tomb := bpf.AegisTombValue{LastSeenNs: now, RemovedNs: now, Cause: uint32(bpf.AegisTombCauseTOMB_REVOKED)}
	if err := h.objs.TombsV4.Put(&bpf.AegisSessionKeyV4{Src: user.As4(), Dst: svc.As4(), Dport: 5001, Proto: tu.ProtoUDP}, &tomb); err != nil {
		b.Fatal(err)
	}
	flow := dgram(svc, peer, 45000, 53)
	if ret, err := h.runEgress(flow.Bytes()); err != nil || ret != -1 {
		b.Fatalf("egress: %d %v", ret, err)
	}
	cases := []struct {
		name string
		pkt  pkt
	}{
		{"live-flow", flow},
		{"session-reply", dgram(svc, user, 5000, 40000)},
		{"tombstone", dgram(svc, user, 5001, 40000)},
		{"allow-reply", dgram(svc, mgmt, 161, 40000)},
	}
	const rounds, repeat = 9, 200_000
	samples := map[string][]float64{}
	for range b.N {
		for range rounds {
			for _, c := range cases {
				ret, per, err := h.egress.Benchmark(c.pkt.Bytes(), repeat, nil)
				if err != nil || int32(ret) != -1 {
					b.Fatalf("%s: %d %v", c.name, int32(ret), err)
				}
				samples[c.name] = append(samples[c.name], float64(per.Nanoseconds()))
			}
		}
	}
	for _, c := range cases {
		s := slices.Clone(samples[c.name])
		slices.Sort(s)
		med := s[len(s)/2]
		b.ReportMetric(med, c.name+"-ns/pkt")
		fmt.Printf("%-14s %6.1f ns/pkt\n", c.name, med)
	}
	for _, k := range []bpf.AegisFlowKeyV4{
		{Src: user.As4(), Dst: svc.As4(), Sport: 40000, Dport: 5001, Proto: tu.ProtoUDP},
		{Src: user.As4(), Dst: svc.As4(), Sport: 40000, Dport: 5000, Proto: tu.ProtoUDP},
	} {
		var fv bpf.AegisFlowValue
		if h.objs.FlowsV4.Lookup(&k, &fv) == nil {
			b.Fatalf("a flow was created for %+v", k)
		}
	}
}
