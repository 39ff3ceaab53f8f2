package controlplane_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// fixedStore is a shared store whose snapshot is given and never changes:
// a restore from it costs the control plane's own work only, building the
// index and writing the maps.
type fixedStore struct{ snap store.Snapshot }

func (s *fixedStore) Snapshot(context.Context) (store.Snapshot, error) { return s.snap, nil }

func (s *fixedStore) Watch(ctx context.Context, _ int64) <-chan store.Batch {
	ch := make(chan store.Batch)
	go func() {
		<-ctx.Done()
		close(ch)
	}()
	return ch
}

func (s *fixedStore) Txn(context.Context, []store.Op) (int64, error) {
	return 0, errors.New("fixed store: read only")
}
func (s *fixedStore) PublishActivity(context.Context, []store.Activity, []store.Activity) error {
	return nil
}
func (s *fixedStore) SetApplied(int64)                            {}
func (s *fixedStore) WaitApplied(context.Context, int64) []string { return nil }
func (s *fixedStore) Probe(context.Context) error                 { return nil }
func (s *fixedStore) Shared() bool                                { return true }
func (s *fixedStore) Close() error                                { return nil }

// BenchmarkStoreRestore starts a control plane on empty maps with a store
// of 1,000,000 sessions, as a gateway joins: "read" with the snapshot
// already read (the control plane's own work only: the index and the
// maps), "etcd" from three etcd members on loopback (the whole restore).
// Reported per restore: the wall time from the start to the maps
// restored, and this process's CPU time in it (the members' is not).
//
//	go test -run '^$' -bench StoreRestore -benchtime 3x ./controlplane/
func BenchmarkStoreRestore(b *testing.B) {
	const n = 1_000_000
	now := time.Now().UnixNano()
	entries := make([]store.Entry, n)
	for i := range entries {
		entries[i] = store.Entry{ModRev: int64(i + 1), Record: store.Record{Key: restoreKey(i), User: "bench",
			Created: now, LastSeen: now, IdleTimeout: time.Hour}}
	}
	b.Run("read", func(b *testing.B) {
		st := &fixedStore{snap: store.Snapshot{Rev: n + 1, Entries: entries}}
		benchmarkRestore(b, n, func(int) store.Store { return st })
	})
	b.Run("etcd", func(b *testing.B) {
		ms := make([]tu.EtcdMember, 3)
		for i := range ms {
			ms[i] = tu.EtcdMember{IP: netip.MustParseAddr("127.0.0.1")}
		}
		e := tu.StartEtcdOptions(b, ms, tu.EtcdOptions{})
		filler := openEtcdStore(b, e, "filler")
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for w := range 16 {
			wg.Go(func() {
				for i := w * store.MaxTxnOps; i < n; i += 16 * store.MaxTxnOps {
					var ops []store.Op
					for j := i; j < min(n, i+store.MaxTxnOps); j++ {
						ops = append(ops, store.Op{Record: entries[j].Record, IfModRev: -1})
					}
					if _, err := filler.Txn(context.Background(), ops); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		filler.Close()
		close(errs)
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
		benchmarkRestore(b, n, func(i int) store.Store { return openEtcdStore(b, e, fmt.Sprintf("gw-%d", i)) })
	})
}

func restoreKey(i int) state.Key {
	return state.Key{Src: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%4)}), Port: uint16(1024 + i%50000), Proto: state.TCP}
}

func benchmarkRestore(b *testing.B, n int, open func(i int) store.Store) {
	var cpu time.Duration
	i := 0
	for b.Loop() {
		b.StopTimer()
		st := open(i)
		i++
		runtime.GC()
		b.StartTimer()
		c0 := restoreCPU()
		e := newEnv(b, envOptions{store: st, gateway: "gw", capacity: 1 << 20, activityInterval: time.Hour, defIdle: time.Hour})
		cpu += restoreCPU() - c0
		b.StopTimer()
		if v4, _, err := e.maps().Count(); err != nil || v4 != n {
			b.Fatalf("maps hold %d sessions (%v), want %d", v4, err, n)
		}
		e.stop()
		b.StartTimer()
	}
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "sessions/s")
}

func restoreCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
