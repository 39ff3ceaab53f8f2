package bench

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// BuildsEnv names the data path objects BenchmarkDataPathBuilds compares,
// comma-separated paths to aegis_bpfel.o files of builds with this one's
// maps (for instance one from `git show <commit>:bpf/aegis_bpfel.o`).
const BuildsEnv = "AEGIS_BENCH_OBJECTS"

// BenchmarkDataPathBuilds compares data path builds inside one process:
// every object is loaded beside the others and beside one floor and one
// reference, and every round measures all of them back to back, so each
// round's ratios share their baselines. Separate processes place each
// program's machine code afresh, which moves a case by a few nanoseconds
// from run to run; here all builds share the run. It reports, per build
// and case, the median time and the median of the rounds' ratios of the
// cost over the floor to the reference's. The sessions, flow-free setup
// and marks are BenchmarkDataPath's.
func BenchmarkDataPathBuilds(b *testing.B) {
	paths := os.Getenv(BuildsEnv)
	if paths == "" {
		b.Skipf("set %s to the objects to compare", BuildsEnv)
	}
	tu.RequireKernel(b)
	floor := floorProgram(b)
	client4, svc4 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.10")
	tcp := func(src, dst netip.Addr, port uint16) []byte {
		return tu.Frame{Src: src, Dst: dst, Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: port}.Bytes()
	}
	hit := tcp(client4, svc4, 8080)
	client6, svc6 := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:2::10")

	type bcase struct {
		name string
		prog *ebpf.Program
		pkt  []byte
		want bpf.Action
	}
	cases := []bcase{{"floor", floor, hit, bpf.XDPDrop}, {"reference", referenceProgram(b, client4, svc4, 8080), hit, bpf.XDPPass}}
	for i, path := range strings.Split(paths, ",") {
		spec, err := ebpf.LoadCollectionSpec(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := bpf.DirectConfig(spec); err != nil {
			b.Fatal(err)
		}
		prog, m, _ := aegisProgramOf(b, spec, 1024)
		grant(b, m, state.Key{Src: client4, Dst: svc4, Port: 8080, Proto: state.TCP})
		grant(b, m, state.Key{Src: client6, Dst: svc6, Port: 8080, Proto: state.TCP})
		now := state.Now()
		anyKey := bpf.AegisSessionKeyV4{Src: client4.As4(), Dst: svc4.As4(), Dport: 8090}
		if err := m.SessionsV4.Put(&anyKey, &bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}); err != nil {
			b.Fatal(err)
		}
		trustMarks(b, m)
		name := fmt.Sprintf("%d:%s", i, path)
		cases = append(cases,
			bcase{name + " hit", prog, hit, bpf.XDPPass},
			bcase{name + " hit-v6", prog, tcp(client6, svc6, 8080), bpf.XDPPass},
			bcase{name + " any-proto-hit", prog, tcp(client4, svc4, 8090), bpf.XDPPass},
			bcase{name + " miss", prog, tcp(client4, svc4, 8081), bpf.XDPDrop},
			bcase{name + " miss-service-port", prog, tcp(netip.MustParseAddr("192.0.2.99"), svc4, 8080), bpf.XDPDrop})
	}

	const rounds = 31
	samples := make(map[string][]float64)
	ratios := make(map[string][]float64)
	for range rounds {
		got := make(map[string]float64)
		for _, c := range cases {
			got[c.name] = measure(b, c.prog, c.pkt, c.want)
			samples[c.name] = append(samples[c.name], got[c.name])
		}
		for _, c := range cases[2:] {
			ratios[c.name] = append(ratios[c.name], (got[c.name]-got["floor"])/(got["reference"]-got["floor"]))
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-60s %8s %10s\n", "case", "ns/pkt", "x ref")
	for _, c := range cases {
		r := "—"
		if len(ratios[c.name]) > 0 {
			r = fmt.Sprintf("%.3f", median(ratios[c.name]))
		}
		fmt.Fprintf(&sb, "%-60s %8.1f %10s\n", c.name, median(samples[c.name]), r)
	}
	b.Log(sb.String())
}
