package store_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// BenchmarkEtcdSnapshot reads a snapshot of 1,000,000 sessions from three
// members on loopback (mutual TLS, as deployed), the read a joining
// gateway does before it writes its maps, with one range request in
// flight at a time and with the default number. The CPU time is this
// process's (the client: decoding and the gRPC stream); the members' is
// the rest of the wall time on a machine this size.
//
//	go test -run '^$' -bench EtcdSnapshot -benchtime 3x ./internal/store/
func BenchmarkEtcdSnapshot(b *testing.B) {
	const n = 1_000_000
	ms := make([]tu.EtcdMember, 3)
	for i := range ms {
		ms[i] = tu.EtcdMember{IP: netip.MustParseAddr("127.0.0.1")}
	}
	e := tu.StartEtcdOptions(b, ms, tu.EtcdOptions{})
	st := openEtcd(b, e, "bench", "/aegis/")
	now := time.Now().UnixNano()
	tu.FillStore(b, st, n, func(i int) store.Record { return sessionRecord(i, now) })
	for _, reads := range []int{1, store.DefaultSnapshotReads} {
		b.Run(fmt.Sprintf("reads=%d", reads), func(b *testing.B) {
			defer store.SetSnapshotReads(reads)()
			var cpu, members time.Duration
			for b.Loop() {
				runtime.GC()
				c0, m0 := cpuNow(), childrenCPU(b, "etcd")
				snap, err := st.Snapshot(context.Background())
				cpu += cpuNow() - c0
				members += childrenCPU(b, "etcd") - m0
				if err != nil || len(snap.Entries) != n {
					b.Fatalf("snapshot of %d sessions: %v", len(snap.Entries), err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "sessions/s")
			b.ReportMetric(cpu.Seconds()/float64(b.N), "client-cpu-s/op")
			b.ReportMetric(members.Seconds()/float64(b.N), "members-cpu-s/op")
		})
	}
}

// sessionRecord is the i-th of the sessions the benchmarks store: sources
// 10.0.0.0 and up.
func sessionRecord(i int, now int64) store.Record {
	k := state.Key{Src: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%4)}), Port: uint16(1024 + i%50000), Proto: state.TCP}
	return store.Record{Key: k, User: "bench", Created: now, LastSeen: now, IdleTimeout: time.Hour}
}

func cpuNow() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// childrenCPU is the CPU time of this process's children named comm, from
// /proc.
func childrenCPU(b *testing.B, comm string) time.Duration {
	b.Helper()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var ticks int64
	for _, p := range stats {
		raw, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid … utime stime: fields 14 and 15.
		s := string(raw)
		open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || end < open || s[open+1:end] != comm {
			continue
		}
		f := strings.Fields(s[end+2:])
		if ppid, _ := strconv.Atoi(f[1]); ppid != os.Getpid() {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + st
	}
	// USER_HZ is 100 on Linux.
	return time.Duration(ticks) * 10 * time.Millisecond
}
