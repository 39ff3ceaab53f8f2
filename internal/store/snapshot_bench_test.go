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
	"sync"
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
	fillSessions(b, st, n)
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

// fillSessions writes n IPv4 sessions the way the fleet benchmark does:
// sources 10.0.0.0 and up, 128 to a transaction, 16 writers.
func fillSessions(b *testing.B, st store.Store, n int) {
	b.Helper()
	now := time.Now().UnixNano()
	const writers = 16
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			ops := make([]store.Op, 0, store.MaxTxnOps)
			for i := w * store.MaxTxnOps; i < n; i += writers * store.MaxTxnOps {
				ops = ops[:0]
				for j := i; j < min(n, i+store.MaxTxnOps); j++ {
					k := state.Key{Src: netip.AddrFrom4([4]byte{10, byte(j >> 16), byte(j >> 8), byte(j)}),
						Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + j%4)}), Port: uint16(1024 + j%50000), Proto: state.TCP}
					ops = append(ops, store.Op{IfModRev: -1, Record: store.Record{Key: k, User: "bench", Created: now, LastSeen: now,
						IdleTimeout: time.Hour}})
				}
				if _, err := st.Txn(context.Background(), ops); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatalf("fill the store: %v", err)
	}
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
