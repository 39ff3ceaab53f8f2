package testutil

import (
	"context"
	"sync"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// FillKeyV4 is the i-th key FillSessionsV4 writes: sources in
// 192.0.2.0/24, destinations in 198.51.100.0/24, ports from 1024, TCP;
// distinct for i below 2^24.
func FillKeyV4(i int) bpf.AegisSessionKeyV4 {
	return bpf.AegisSessionKeyV4{
		Src:   [4]byte{192, 0, 2, byte(i)},
		Dst:   [4]byte{198, 51, 100, byte(i >> 8)},
		Dport: uint16(1024 + i>>16),
		Proto: uint8(state.TCP),
	}
}

// FillSessionsV4 writes n sessions of user, last seen at lastSeen, into
// the sessions_v4 map pinned under dir, with batch updates: a full map of
// a quarter million sessions takes a fraction of a second.
func FillSessionsV4(t testing.TB, dir string, n int, user string, lastSeen uint64) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(state.MapPath(dir, state.MapSessionsV4), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var v bpf.AegisSessionValue
	v.LastSeenNs, v.CreatedNs = lastSeen, lastSeen
	for i := 0; i < len(user) && i < len(v.User)-1; i++ {
		v.User[i] = int8(user[i])
	}
	const chunk = 8192
	keys := make([]bpf.AegisSessionKeyV4, 0, chunk)
	vals := make([]bpf.AegisSessionValue, 0, chunk)
	for i := 0; i < n; i += chunk {
		keys, vals = keys[:0], vals[:0]
		for j := i; j < min(i+chunk, n); j++ {
			keys = append(keys, FillKeyV4(j))
			vals = append(vals, v)
		}
		if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
			t.Fatalf("fill sessions_v4 at %d of %d: %v", i, n, err)
		}
	}
}

// FillStore writes record(0) to record(n-1) into st as new sessions, as a
// fleet that granted them would: store.MaxTxnOps to a transaction (etcd's
// default limit) from 16 writers at once.
func FillStore(tb testing.TB, st store.Store, n int, record func(i int) store.Record) {
	tb.Helper()
	const writers = 16
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			ops := make([]store.Op, 0, store.MaxTxnOps)
			for i := w * store.MaxTxnOps; i < n; i += writers * store.MaxTxnOps {
				ops = ops[:0]
				for j := i; j < min(n, i+store.MaxTxnOps); j++ {
					ops = append(ops, store.Op{Record: record(j), IfModRev: -1})
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
		tb.Fatalf("fill the store: %v", err)
	}
}

// AllowRules parses rules as aegis-loader --allow does, failing t on any
// it refuses.
func AllowRules(t testing.TB, rules ...string) []state.AllowRule {
	t.Helper()
	out := make([]state.AllowRule, 0, len(rules))
	for _, s := range rules {
		r, err := state.ParseAllowRule(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}
