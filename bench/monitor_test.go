package bench

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

const (
	monitorCapacity   = 262144 // the build's default
	monitorStalled    = 50
	monitorGrantCalls = 20_000
)

// BenchmarkControlPlaneUnderMonitorLoad measures LoginEvent latency at
// concurrency 1 on a full IPv4 map of the default capacity, first with no
// MonitorSessions stream, then with 50 streams whose client never reads
// and one that does, snapshots every second. The grants are new IPv6
// sessions (the IPv4 map is full).
//
//	go test -run '^$' -bench ControlPlaneUnderMonitorLoad -benchtime 1x ./bench/
func BenchmarkControlPlaneUnderMonitorLoad(b *testing.B) {
	tu.RequireKernel(b)
	srv := startCPServerWith(b, monitorCapacity, func(pin string) {
		tu.FillSessionsV4(b, pin, monitorCapacity, "bulk", state.Now())
	}, "--monitor-interval", "1s", "--monitor-max-streams-per-peer", "64", "--monitor-max-streams", "64")
	client := srv.client(b)
	next := 0
	grants := func(n int) []time.Duration {
		lat := make([]time.Duration, n)
		for i := range n {
			req := &agentv1.LoginEventRequest{User: "bench", SrcIp: fmt.Sprintf("2001:db8:%x:%x::1", next>>16, next&0xffff),
				DstIp: "2001:db8:ffff::10", DstPort: 443}
			next++
			start := time.Now()
			if _, err := client.LoginEvent(context.Background(), req); err != nil {
				b.Fatal(err)
			}
			lat[i] = time.Since(start)
		}
		slices.Sort(lat)
		return lat
	}
	grants(500) // warm up
	quiet := grants(monitorGrantCalls)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range monitorStalled {
		conn := srv.conn(b)
		_ = i
		if _, err := session.NewSessionManagerClient(conn).MonitorSessions(ctx, &session.Empty{}); err != nil {
			b.Fatal(err)
		}
	}
	reader, err := session.NewSessionManagerClient(srv.conn(b)).MonitorSessions(ctx, &session.Empty{})
	if err != nil {
		b.Fatal(err)
	}
	var snapshots atomic.Int64
	go func() {
		for {
			if _, err := reader.Recv(); err != nil {
				return
			}
			snapshots.Add(1)
		}
	}()
	start := time.Now()
	loaded := grants(monitorGrantCalls)
	elapsed := time.Since(start)

	r := map[string]float64{
		"quiet-p50-us": float64(percentile(quiet, 0.5).Microseconds()), "quiet-p99-us": float64(percentile(quiet, 0.99).Microseconds()),
		"monitored-p50-us": float64(percentile(loaded, 0.5).Microseconds()), "monitored-p99-us": float64(percentile(loaded, 0.99).Microseconds()),
		"monitored-max-us": float64(loaded[len(loaded)-1].Microseconds()),
	}
	for k, v := range r {
		b.ReportMetric(v, k)
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nLoginEvent at c1, full IPv4 map of %d sessions\n", monitorCapacity)
	fmt.Fprintf(&sb, "%-52s %8.0f us p50 %8.0f us p99\n", "no MonitorSessions stream", r["quiet-p50-us"], r["quiet-p99-us"])
	fmt.Fprintf(&sb, "%-52s %8.0f us p50 %8.0f us p99 %8.0f us max\n", fmt.Sprintf("%d never-reading streams + 1 reading, 1 s interval", monitorStalled),
		r["monitored-p50-us"], r["monitored-p99-us"], r["monitored-max-us"])
	fmt.Fprintf(&sb, "(%d calls each; the reading stream got %d snapshots in %.1f s)\n", monitorGrantCalls, snapshots.Load(), elapsed.Seconds())
	b.Log(sb.String())
}
