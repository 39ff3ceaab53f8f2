package bench

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// BenchmarkEventFlood measures what verdict events cost a flood of drops:
// the same build with drop events at the default rate (the bucket is empty
// after the first hundred of the million runs, so nearly every frame takes
// the suppressed path) beside drop events off, interleaved, xdpRounds
// times. Target: within 1.1x.
//
//	go test -run '^$' -bench EventFlood -benchtime 1x ./bench/
func BenchmarkEventFlood(b *testing.B) {
	tu.RequireKernel(b)
	miss := tu.Frame{Src: netip.MustParseAddr("203.0.113.9"), Dst: netip.MustParseAddr("198.51.100.10"),
		Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: 8081}.Bytes()

	setEvents := func(m *state.Maps, off bool) {
		cfg := state.Config{Controller: netip.MustParseAddr("198.51.100.5"), ControllerPort: 443, GRPCPort: 50001,
			DefaultIdleTimeout: time.Minute, NoDropEvents: off}
		v, err := cfg.Value()
		if err != nil {
			b.Fatal(err)
		}
		if err := m.Config.Put(uint32(0), &v); err != nil {
			b.Fatal(err)
		}
	}
	on, onMaps, _ := aegisProgram(b, 1024)
	setEvents(onMaps, false)
	off, offMaps, _ := aegisProgram(b, 1024)
	setEvents(offMaps, true)

	cases := []struct {
		name string
		prog *ebpf.Program
	}{{"drop-events-off", off}, {"drop-events-flood", on}}
	samples := make(map[string][]float64)
	for range xdpRounds {
		for _, c := range cases {
			samples[c.name] = append(samples[c.name], measure(b, c.prog, miss, bpf.XDPDrop))
		}
	}
	offNs, onNs := median(samples["drop-events-off"]), median(samples["drop-events-flood"])
	b.ReportMetric(offNs, "drop-events-off-ns/pkt")
	b.ReportMetric(onNs, "drop-events-flood-ns/pkt")
	b.ReportMetric(onNs/offNs, "flood/off")

	var per []bpf.AegisEventLimit
	if err := onMaps.EventLimits.Lookup(uint32(bpf.EventKindDrop), &per); err != nil {
		b.Fatal(err)
	}
	var emitted, suppressed uint64
	for _, l := range per {
		emitted += l.Emitted
		suppressed += l.Suppressed + l.Lost
	}
	mark := "met"
	if onNs > 1.1*offNs {
		mark = "MISSED"
	}
	b.Logf("\ndrop events off    %6.1f ns/pkt\ndrop events flood  %6.1f ns/pkt (%d emitted, %d suppressed or lost)\ntarget flood <= 1.1 x off (%.3f) %s",
		offNs, onNs, emitted, suppressed, onNs/offNs, mark)
	if emitted == 0 || suppressed == 0 {
		b.Fatal(fmt.Sprintf("the flood case emitted %d and suppressed %d: not the path measured", emitted, suppressed))
	}
}
