package controlplane_test

import (
	"context"
	"errors"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
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
// of 1,000,000 sessions already read: the part of a gateway's join after
// the snapshot's requests. Reported per restore: the wall time from the
// start to the maps restored, and this process's CPU time in it.
//
//	go test -run '^$' -bench StoreRestore -benchtime 3x ./controlplane/
func BenchmarkStoreRestore(b *testing.B) {
	const n = 1_000_000
	now := time.Now().UnixNano()
	st := &fixedStore{snap: store.Snapshot{Rev: n + 1, Entries: make([]store.Entry, n)}}
	for i := range st.snap.Entries {
		k := state.Key{Src: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
			Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%4)}), Port: uint16(1024 + i%50000), Proto: state.TCP}
		st.snap.Entries[i] = store.Entry{ModRev: int64(i + 1), Record: store.Record{Key: k, User: "bench",
			Created: now, LastSeen: now, IdleTimeout: time.Hour}}
	}
	var cpu time.Duration
	for b.Loop() {
		runtime.GC()
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
