package controlplane_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"runtime/debug"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/controlplane"
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
	record := func(i int) store.Record {
		return store.Record{Key: restoreKey(i), User: "bench", Created: now, LastSeen: now, IdleTimeout: time.Hour}
	}
	b.Run("read", func(b *testing.B) {
		st := &fixedStore{snap: store.Snapshot{Rev: n + 1, Entries: make([]store.Entry, n)}}
		for i := range st.snap.Entries {
			st.snap.Entries[i] = store.Entry{ModRev: int64(i + 1), Record: record(i)}
		}
		benchmarkRestore(b, n, func(int) store.Store { return st })
	})
	b.Run("etcd", func(b *testing.B) {
		ms := make([]tu.EtcdMember, 3)
		for i := range ms {
			ms[i] = tu.EtcdMember{IP: netip.MustParseAddr("127.0.0.1")}
		}
		e := tu.StartEtcdOptions(b, ms, tu.EtcdOptions{})
		filler := openEtcdStore(b, e, "filler")
		tu.FillStore(b, filler, n, record)
		filler.Close()
		// Nothing of the fill is left on the heap: the restore starts as a
		// fresh process's does. With the daemon's collector settings
		// (GOGC=400 and the soft limit of the default MemoryBound), the
		// limit fixed or raised for the store's index as the daemon does.
		ca, cert, key := e.ClientTLS()
		conf, err := store.TLSConfig(ca, cert, key)
		if err != nil {
			b.Fatal(err)
		}
		var memory func(int)
		open := func(i int) store.Store {
			st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: e.Endpoints(), TLS: conf, Prefix: "/aegis/",
				Gateway: fmt.Sprintf("gw-%d", i), Log: zerolog.Nop(), SnapshotSize: memory})
			if err != nil {
				b.Fatal(err)
			}
			return st
		}
		bound := controlplane.MemoryBound(controlplane.DefaultMonitorStreams, controlplane.DefaultMonitorMaxMessageSize)
		for _, c := range []struct {
			name   string
			memory func(int)
		}{
			{"limit=fixed", nil},
			{"limit=store", func(n int) { debug.SetMemoryLimit(controlplane.StoreMemoryBound(bound, n, 0)) }},
		} {
			b.Run(c.name, func(b *testing.B) {
				memory = c.memory
				defer debug.SetGCPercent(debug.SetGCPercent(400))
				defer debug.SetMemoryLimit(debug.SetMemoryLimit(bound))
				benchmarkRestoreWith(b, n, open, c.memory)
			})
		}
	})
}

func restoreKey(i int) state.Key {
	return state.Key{Src: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}),
		Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%4)}), Port: uint16(1024 + i%50000), Proto: state.TCP}
}

func benchmarkRestore(b *testing.B, n int, open func(i int) store.Store) {
	benchmarkRestoreWith(b, n, open, nil)
}

func benchmarkRestoreWith(b *testing.B, n int, open func(i int) store.Store, memory func(int)) {
	var cpu time.Duration
	i := 0
	limit := debug.SetMemoryLimit(-1) // each restore starts at the limit given
	for b.Loop() {
		b.StopTimer()
		debug.SetMemoryLimit(limit)
		st := open(i)
		i++
		runtime.GC()
		b.StartTimer()
		c0 := restoreCPU()
		e := newEnv(b, envOptions{store: st, gateway: "gw", capacity: 1 << 20, activityInterval: time.Hour, defIdle: time.Hour,
			storeMemory: memory})
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

// A restore tells Options.StoreMemory the size of the index it built.
func TestStoreMemoryFollowsIndex(t *testing.T) {
	tu.RequireKernel(t)
	const n = 3000
	now := time.Now().UnixNano()
	st := &fixedStore{snap: store.Snapshot{Rev: n + 1, Entries: make([]store.Entry, n)}}
	for i := range st.snap.Entries {
		st.snap.Entries[i] = store.Entry{ModRev: int64(i + 1), Record: store.Record{Key: restoreKey(i), User: "u",
			Created: now, LastSeen: now, IdleTimeout: time.Hour}}
	}
	var mu sync.Mutex
	var told []int
	e := newEnv(t, envOptions{store: st, gateway: "gw", activityInterval: time.Hour, defIdle: time.Hour,
		storeMemory: func(n int) { mu.Lock(); told = append(told, n); mu.Unlock() }})
	if v4, _, err := e.maps().Count(); err != nil || v4 != n {
		t.Fatalf("maps hold %d sessions (%v), want %d", v4, err, n)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(told) != 1 || told[0] != n {
		t.Fatalf("memory told %v, want [%d]", told, n)
	}
	bound := int64(200 << 20)
	for _, c := range []struct {
		sessions       int
		ceiling, limit int64
	}{
		{n, 0, bound},                          // the index fits the monitor's bound
		{1_000_000, 0, 64<<20 + 1_000_000*768}, // 64 MiB and 768 bytes a session
		{1_000_000, 512 << 20, 448 << 20},      // seven eighths of the cgroup's hard limit
		{1_000_000, 128 << 20, bound},          // never below the monitor's bound
	} {
		if got := controlplane.StoreMemoryBound(bound, c.sessions, c.ceiling); got != c.limit {
			t.Errorf("limit for %d sessions under %d: %d, want %d", c.sessions, c.ceiling, got, c.limit)
		}
	}
}
