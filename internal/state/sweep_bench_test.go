package state_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// These compare the ways a sweep can delete, on one map of 200,000 IPv4
// sessions half of which are expired. The machine is shared: compare the
// CPU time (getrusage, the whole process), not the wall time.
//
//	go test -run '^$' -bench Sweep -benchtime 5x ./internal/state/

// fillHalfExpired writes n IPv4 sessions, every other one expired.
func fillHalfExpired(b *testing.B, m *state.Maps, n int) {
	b.Helper()
	now := state.Now()
	keys := make([]bpf.AegisSessionKeyV4, n)
	vals := make([]bpf.AegisSessionValue, n)
	for i := range n {
		keys[i] = bpf.AegisSessionKeyV4{Src: [4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}, Dst: [4]byte{198, 51, 100, 10}, Dport: 443, Proto: 6}
		vals[i] = bpf.AegisSessionValue{LastSeenNs: now, CreatedNs: now, IdleTimeoutNs: uint64(time.Hour)}
		if i%2 == 0 {
			vals[i].LastSeenNs = now - uint64(2*time.Hour)
		}
	}
	if _, err := m.SessionsV4.BatchUpdate(keys, vals, nil); err != nil {
		b.Fatal(err)
	}
}

func cpuNow() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchmarkSweep(b *testing.B, setup func(*state.Sweeper)) {
	const n = 200_000
	m, _ := sweepMaps(b, time.Minute)
	sw := state.NewSweeper()
	if setup != nil {
		setup(sw)
	}
	var cpu time.Duration
	for b.Loop() {
		b.StopTimer()
		fillHalfExpired(b, m, n)
		b.StartTimer()
		c0 := cpuNow()
		res, err := sw.Sweep(context.Background(), m, nil)
		cpu += cpuNow() - c0
		if err != nil || res.Reaped() != n/2 {
			b.Fatalf("%+v %v", res, err)
		}
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/(n/2), "cpu-ns/reaped")
}

// The sweep as built: each section re-reads key by key and deletes with
// BPF_MAP_DELETE_BATCH.
func BenchmarkSweep(b *testing.B) { benchmarkSweep(b, nil) }

// The earlier design: one LookupAndDelete per expired session, no section.
func BenchmarkSweepLegacy(b *testing.B) {
	benchmarkSweep(b, func(s *state.Sweeper) { state.SetLegacySweep(s, nil) })
}

// What the write protocol adds to a grant: two reads of the sweep
// sequence (BenchmarkSweepSeqRead, one read), against the grant itself,
// a new session (BenchmarkGrantNew: an insert) or a refresh
// (BenchmarkGrantRefresh: a failed insert, a lookup and an update).
func BenchmarkSweepSeqRead(b *testing.B) {
	m, _ := sweepMaps(b, time.Minute)
	for b.Loop() {
		if _, err := state.ReadSweepSeq(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGrantNew(b *testing.B) {
	m, _ := sweepMaps(b, time.Minute)
	s := state.Session{Key: key4(1), User: "bench", LastSeen: state.Now(), Created: state.Now(), IdleTimeout: time.Hour}
	for b.Loop() {
		b.StopTimer()
		_ = m.Revoke(s.Key)
		b.StartTimer()
		if err := m.Grant(s); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGrantRefresh(b *testing.B) {
	m, _ := sweepMaps(b, time.Minute)
	s := state.Session{Key: key4(1), User: "bench", LastSeen: state.Now(), Created: state.Now(), IdleTimeout: time.Hour}
	for b.Loop() {
		if err := m.Grant(s); err != nil {
			b.Fatal(err)
		}
	}
}
