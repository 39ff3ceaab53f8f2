package store_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

func key(i int) state.Key {
	return state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 8)}),
		Port: 22, Proto: state.TCP}
}

func key6(i int) state.Key {
	return state.Key{Src: netip.MustParseAddr(fmt.Sprintf("2001:db8::%x:%x", (i+1)>>16, (i+1)&0xffff)), Dst: netip.MustParseAddr("2001:db8:1::1"),
		Port: 443, Proto: state.Any}
}

func rec(k state.Key, user string) store.Record {
	now := time.Now().UnixNano()
	return store.Record{Key: k, User: user, Created: now, LastSeen: now, IdleTimeout: time.Minute}
}

func TestParseSpec(t *testing.T) {
	for in, want := range map[string]store.Spec{
		"none":                            {Kind: "none"},
		"":                                {Kind: "none"},
		"file:/var/lib/aegis/sessions.db": {Kind: "file", Path: "/var/lib/aegis/sessions.db"},
		"etcd:https://192.0.2.1:2379":     {Kind: "etcd", Endpoints: []string{"https://192.0.2.1:2379"}},
		"etcd:https://a:2379,https://b:1": {Kind: "etcd", Endpoints: []string{"https://a:2379", "https://b:1"}},
	} {
		got, err := store.ParseSpec(in)
		if err != nil || got.Kind != want.Kind || got.Path != want.Path || !slices.Equal(got.Endpoints, want.Endpoints) {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"file:", "etcd:192.0.2.1:2379", "redis:x", "none:x", "etcd:"} {
		if _, err := store.ParseSpec(in); !errors.Is(err, store.ErrInvalidSpec) {
			t.Errorf("ParseSpec(%q) = %v, want ErrInvalidSpec", in, err)
		}
	}
}

func TestCodecs(t *testing.T) {
	for _, k := range []state.Key{key(1), key6(7)} {
		got, err := store.ParseSessionPath(store.SessionPath(k))
		if err != nil || got != k {
			t.Errorf("session path of %v: %v, %v", k, got, err)
		}
	}
	if _, err := store.ParseSessionPath("sessions/192.0.2.1/198.51.100.1/0/6"); err == nil {
		t.Error("port 0 parsed")
	}
	b := []byte{store.ActivityVersion}
	in := []store.Activity{{Key: key(1), LastSeen: 42}, {Key: key6(2), LastSeen: -1}, {Key: key(3), LastSeen: time.Now().UnixNano()}}
	for i := range in {
		b = store.EncodeActivityEntry(b, &in[i])
	}
	out, err := store.DecodeActivity(b)
	if err != nil || !slices.Equal(in, out) {
		t.Fatalf("activity round trip: %v, %v", out, err)
	}
	if _, err := store.DecodeActivity(b[:len(b)-1]); err == nil {
		t.Error("truncated activity decoded")
	}
}

// testStore runs the behaviour both stores share.
func testStore(t *testing.T, st store.Store) {
	ctx := context.Background()
	snap, err := st.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	base := snap.Rev
	w := st.Watch(ctx, base)

	a := rec(key(1), "alice")
	rev1, err := st.Txn(ctx, []store.Op{{Record: a, IfModRev: 0}})
	if err != nil || rev1 <= base {
		t.Fatalf("create: rev %d, %v", rev1, err)
	}
	// Created again on the condition "absent": refused, nothing written.
	if _, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "bob"), IfModRev: 0}}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("second create: %v, want ErrConflict", err)
	}
	a.LastSeen += int64(time.Second)
	rev2, err := st.Txn(ctx, []store.Op{{Record: a, IfModRev: rev1}, {Record: rec(key6(1), "carol"), IfModRev: -1}})
	if err != nil {
		t.Fatal(err)
	}
	// A stale condition (a grant that read rev1): refused.
	if _, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "bob"), IfModRev: rev1}}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("stale refresh: %v, want ErrConflict", err)
	}
	rev3, err := st.Txn(ctx, []store.Op{{Record: store.Record{Key: key6(1)}, Delete: true, IfModRev: -1}})
	if err != nil || rev3 <= rev2 {
		t.Fatalf("delete: %d, %v", rev3, err)
	}
	// Deleting what is not there changes nothing.
	if rev, err := st.Txn(ctx, []store.Op{{Record: store.Record{Key: key6(9)}, Delete: true, IfModRev: -1}}); err != nil || rev != 0 {
		t.Fatalf("delete of nothing: %d, %v", rev, err)
	}

	var got []store.Event
	deadline := time.After(10 * time.Second)
	for len(got) < 4 {
		select {
		case b := <-w:
			if b.Err != nil {
				t.Fatal(b.Err)
			}
			for _, ev := range b.Events {
				if ev.Type != store.ActivityEvent {
					got = append(got, ev)
				}
			}
		case <-deadline:
			t.Fatalf("watch delivered %d of 4 events", len(got))
		}
	}
	want := []struct {
		typ  store.EventType
		k    state.Key
		user string
		rev  int64
	}{{store.Put, key(1), "alice", rev1}, {store.Put, key(1), "alice", rev2}, {store.Put, key6(1), "carol", rev2}, {store.Delete, key6(1), "", rev3}}
	for i, w := range want {
		ev := got[i]
		if ev.Type != w.typ || ev.Entry.Key != w.k || ev.Entry.User != w.user || ev.Entry.ModRev != w.rev {
			t.Errorf("event %d: %v %v %q rev %d; want %v %v %q rev %d", i, ev.Type, ev.Entry.Key, ev.Entry.User, ev.Entry.ModRev, w.typ, w.k, w.user, w.rev)
		}
	}
	if got[1].Entry.LastSeen != a.LastSeen || got[1].Entry.IdleTimeout != time.Minute {
		t.Errorf("refresh event carries %+v", got[1].Entry.Record)
	}

	snap, err = st.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Entries) != 1 || snap.Entries[0].Key != key(1) || snap.Entries[0].ModRev != rev2 || snap.Rev < rev3 {
		t.Fatalf("snapshot: %+v", snap)
	}
}

func TestFileStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sessions.db")
	st, err := store.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	testStore(t, st)
	// One process at a time.
	if _, err := store.OpenFile(path); err == nil {
		t.Fatal("second open of the file store succeeded")
	}
	// Activity raises the stored last-seen time, never lowers it.
	later := time.Now().Add(time.Hour).UnixNano()
	if err := st.PublishActivity(context.Background(), nil, []store.Activity{{Key: key(1), LastSeen: later}, {Key: key(2), LastSeen: later}}); err != nil {
		t.Fatal(err)
	}
	if err := st.PublishActivity(context.Background(), nil, []store.Activity{{Key: key(1), LastSeen: 1}}); err != nil {
		t.Fatal(err)
	}
	snap, _ := st.Snapshot(context.Background())
	rev := snap.Rev
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := store.ShiftTimes(path, time.Hour); err != nil {
		t.Fatal(err)
	}
	// Reopened: the sessions, their revisions and the counter survive.
	st, err = store.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	snap, err = st.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Entries) != 1 || snap.Rev != rev {
		t.Fatalf("after reopen: %+v, rev %d want %d", snap, snap.Rev, rev)
	}
	if got := snap.Entries[0].LastSeen; got != later-int64(time.Hour) {
		t.Errorf("last seen %d, want the published %d shifted by an hour", got, later-int64(time.Hour))
	}
	// A watcher from a revision the file no longer has is told to resync.
	w := st.Watch(context.Background(), rev-1)
	if b := <-w; !errors.Is(b.Err, store.ErrCompacted) {
		t.Fatalf("watch from an old revision: %v", b.Err)
	}
}

func openEtcd(t testing.TB, e *tu.Etcd, id, prefix string) *store.Etcd {
	t.Helper()
	ca, cert, keyFile := e.ClientTLS()
	conf, err := store.TLSConfig(ca, cert, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: e.Endpoints(), TLS: conf, Prefix: prefix, Gateway: id,
		LeaseTTL: 2 * time.Second, Log: zerolog.New(zerolog.NewTestWriter(t))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func rawClient(t *testing.T, e *tu.Etcd) *clientv3.Client {
	c, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), TLS: e.ClientConfig(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestEtcdStore(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	testStore(t, openEtcd(t, e, "gw-a", "/test/"))
	// The prefix separates fleets.
	snap, err := openEtcd(t, e, "gw-a", "/other/").Snapshot(context.Background())
	if err != nil || len(snap.Entries) != 0 {
		t.Fatalf("another prefix sees %+v, %v", snap, err)
	}
}

// A snapshot larger than one page reads every session at one revision.
func TestEtcdSnapshotPages(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	st := openEtcd(t, e, "gw-a", "/aegis/")
	ctx := context.Background()
	defer store.SetSnapshotPage(1000)()
	const n = 5*1000 + 300
	var ops []store.Op
	for i := range n {
		k := state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 8)}), Port: 22, Proto: state.TCP}
		ops = append(ops, store.Op{Record: rec(k, "u"), IfModRev: -1})
		if len(ops) == store.MaxTxnOps || i == n-1 {
			if _, err := st.Txn(ctx, ops); err != nil {
				t.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	snap, err := st.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Entries) != n {
		t.Fatalf("snapshot has %d sessions, want %d", len(snap.Entries), n)
	}
}

// A snapshot split into many ranges (small pages, so that the ranges are
// split deep) holds every session exactly once, IPv4 and IPv6, with keys
// that are no sessions at the bounds of the ranges skipped, and is the
// store at its revision while writes go on.
func TestEtcdSnapshotRanges(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	st := openEtcd(t, e, "gw-a", "/aegis/")
	raw := rawClient(t, e)
	ctx := context.Background()
	defer store.SetSnapshotPage(40)()
	defer store.SetSnapshotReads(3)()
	var keys []state.Key
	for _, first := range []string{"1", "9", "10", "100", "192", "255"} {
		for i := range 300 {
			keys = append(keys, state.Key{Src: netip.MustParseAddr(fmt.Sprintf("%s.%d.%d.%d", first, i%7, i/250, i%250)),
				Dst: netip.MustParseAddr("198.51.100.1"), Port: uint16(1 + i), Proto: state.TCP})
		}
	}
	for _, pfx := range []string{"2001:db8::", "fd00::", "::"} {
		for i := range 200 {
			keys = append(keys, state.Key{Src: netip.MustParseAddr(fmt.Sprintf("%s%x", pfx, i+1)),
				Dst: netip.MustParseAddr("2001:db8:1::1"), Port: 443, Proto: state.UDP})
		}
	}
	var ops []store.Op
	for i, k := range keys {
		ops = append(ops, store.Op{Record: rec(k, "u"), IfModRev: -1})
		if len(ops) == store.MaxTxnOps || i == len(keys)-1 {
			if _, err := st.Txn(ctx, ops); err != nil {
				t.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	// Keys that are no sessions, on and next to the bounds where ranges
	// are split: skipped, and nothing else lost for them.
	for _, k := range []string{"", "1", "10", "10.", "2001:", ":", "/", "f", "g", "zz", "\xff", "10.0.0.1/x"} {
		if _, err := raw.Put(ctx, "/aegis/sessions/"+k, "{}"); err != nil {
			t.Fatal(err)
		}
	}
	sessionsAt := func(rev int64) map[state.Key]bool {
		resp, err := raw.Get(ctx, "/aegis/sessions/", clientv3.WithPrefix(), clientv3.WithRev(rev))
		if err != nil {
			t.Fatal(err)
		}
		out := map[state.Key]bool{}
		for _, kv := range resp.Kvs {
			if k, err := store.ParseSessionPath(strings.TrimPrefix(string(kv.Key), "/aegis/")); err == nil {
				out[k] = true
			}
		}
		return out
	}
	check := func(what string) {
		t.Helper()
		snap, err := st.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := sessionsAt(snap.Rev)
		got := map[state.Key]bool{}
		for _, en := range snap.Entries {
			if got[en.Key] {
				t.Fatalf("%s: %v twice in the snapshot", what, en.Key)
			}
			got[en.Key] = true
			if !want[en.Key] {
				t.Errorf("%s: %v in the snapshot, not in the store at revision %d", what, en.Key, snap.Rev)
			}
		}
		if len(got) != len(want) {
			t.Fatalf("%s: snapshot holds %d sessions, the store %d at revision %d", what, len(got), len(want), snap.Rev)
		}
	}
	check("still")
	if n := len(keys); n < 2000 {
		t.Fatalf("only %d sessions", n)
	}
	// Meanwhile a writer revokes and grants: each snapshot is still the
	// store at one revision.
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		defer close(done)
		for i := 0; wctx.Err() == nil; i++ {
			k := keys[(i*37)%len(keys)]
			ops := []store.Op{{Record: store.Record{Key: k}, Delete: true, IfModRev: -1}, {Record: rec(key(i%250), "w"), IfModRev: -1}}
			if _, err := st.Txn(wctx, ops); err != nil && wctx.Err() == nil {
				done <- err
				return
			}
		}
	}()
	for i := range 3 {
		check(fmt.Sprintf("during writes, %d", i))
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A snapshot whose revision is compacted while it reads starts again at
// a newer one.
func TestEtcdSnapshotCompactedMeanwhile(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	st := openEtcd(t, e, "gw-a", "/aegis/")
	raw := rawClient(t, e)
	ctx := context.Background()
	if _, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "alice"), IfModRev: -1}}); err != nil {
		t.Fatal(err)
	}
	var first int64
	defer store.SetSnapshotRevHook(func(rev int64) {
		if first != 0 {
			return
		}
		first = rev
		resp, err := raw.Put(ctx, "/aegis/sessions/x", "{}")
		if err == nil {
			_, err = raw.Compact(ctx, resp.Header.Revision)
		}
		if err != nil {
			t.Error(err)
		}
	})()
	snap, err := st.Snapshot(ctx)
	if err != nil || len(snap.Entries) != 1 || snap.Rev <= first {
		t.Fatalf("snapshot %+v at %d (first at %d): %v", snap.Entries, snap.Rev, first, err)
	}
}

func TestEtcdActivityShards(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	a, b := openEtcd(t, e, "gw-a", "/aegis/"), openEtcd(t, e, "gw-b", "/aegis/")
	ctx := context.Background()
	raw := rawClient(t, e)
	snap, _ := b.Snapshot(ctx)
	w := b.Watch(ctx, snap.Rev)

	// 100,000 sessions, a fifth IPv6: about 2.4 MB, so several shards.
	var all []store.Activity
	for i := range 100000 {
		k := state.Key{Src: netip.AddrFrom4([4]byte{192, 0, byte(i >> 16), byte(i >> 8)}), Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), Port: 443, Proto: state.TCP}
		if i%5 == 0 {
			k = key6(i)
		}
		all = append(all, store.Activity{Key: k, LastSeen: int64(i)})
	}
	if err := a.PublishActivity(ctx, all, nil); err != nil {
		t.Fatal(err)
	}
	resp, err := raw.Get(ctx, "/aegis/activity/gw-a/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) < 4 {
		t.Fatalf("%d shards for 100,000 sessions", len(resp.Kvs))
	}
	for _, kv := range resp.Kvs {
		if len(kv.Value) > store.MaxActivityShard {
			t.Errorf("shard %s is %d bytes, over %d", kv.Key, len(kv.Value), store.MaxActivityShard)
		}
	}
	rev := resp.Header.Revision
	// Nothing changed: nothing written.
	if err := a.PublishActivity(ctx, all, nil); err != nil {
		t.Fatal(err)
	}
	// One session advanced: one shard written.
	all[7].LastSeen = 1 << 40
	if err := a.PublishActivity(ctx, all, nil); err != nil {
		t.Fatal(err)
	}
	resp, _ = raw.Get(ctx, "/aegis/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if resp.Header.Revision != rev+1 {
		t.Errorf("revision %d after an unchanged and a one-session publication from %d: want one write", resp.Header.Revision, rev)
	}

	// The other gateway sees every entry, by watch and by snapshot; a
	// gateway never sees its own.
	seen := map[state.Key]int64{}
	deadline := time.After(20 * time.Second)
	for len(seen) < len(all) || seen[all[7].Key] != 1<<40 {
		select {
		case bt := <-w:
			if bt.Err != nil {
				t.Fatal(bt.Err)
			}
			for _, ev := range bt.Events {
				if ev.Type == store.ActivityEvent {
					if ev.Gateway != "gw-a" {
						t.Fatalf("activity of %q", ev.Gateway)
					}
					for _, x := range ev.Activity {
						seen[x.Key] = max(seen[x.Key], x.LastSeen)
					}
				}
			}
		case <-deadline:
			t.Fatalf("watch delivered %d of %d activity entries", len(seen), len(all))
		}
	}
	snapB, err := b.Snapshot(ctx)
	if err != nil || len(snapB.Activity) != len(all) {
		t.Fatalf("gw-b's snapshot has %d activity entries, want %d (%v)", len(snapB.Activity), len(all), err)
	}
	snapA, _ := a.Snapshot(ctx)
	if len(snapA.Activity) != 0 {
		t.Errorf("gw-a's snapshot has its own %d activity entries", len(snapA.Activity))
	}
	// Fewer sessions: fewer shards, the extra ones deleted.
	if err := a.PublishActivity(ctx, all[:10], nil); err != nil {
		t.Fatal(err)
	}
	resp, _ = raw.Get(ctx, "/aegis/activity/gw-a/", clientv3.WithPrefix())
	if len(resp.Kvs) != 1 {
		t.Errorf("%d shards for 10 sessions", len(resp.Kvs))
	}
	// A restarted gateway that publishes less removes what its earlier
	// run wrote beyond.
	if err := a.PublishActivity(ctx, all, nil); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a2 := openEtcd(t, e, "gw-a", "/aegis/")
	if err := a2.PublishActivity(ctx, all[:10], nil); err != nil {
		t.Fatal(err)
	}
	resp, _ = raw.Get(ctx, "/aegis/activity/gw-a/", clientv3.WithPrefix())
	if len(resp.Kvs) != 1 {
		t.Errorf("%d shards for 10 sessions after a restart", len(resp.Kvs))
	}
}

// A write waits for the other live gateways' applied revisions; a gateway
// that stopped is not waited for once its key is gone.
func TestEtcdWaitApplied(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	a, b := openEtcd(t, e, "gw-a", "/aegis/"), openEtcd(t, e, "gw-b", "/aegis/")
	a.SetApplied(1)
	b.SetApplied(5)
	waitPeers(t, a, "gw-b", 5)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if lag := a.WaitApplied(ctx, 5); lag != nil {
		t.Fatalf("waiting for revision 5: lagging %v", lag)
	}
	cancel()
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	lag := a.WaitApplied(ctx, 9)
	cancel()
	if !slices.Equal(lag, []string{"gw-b"}) {
		t.Fatalf("waiting for revision 9: lagging %v, want gw-b", lag)
	}
	go func() { time.Sleep(200 * time.Millisecond); b.SetApplied(9) }()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	if lag := a.WaitApplied(ctx, 9); lag != nil {
		t.Fatalf("gw-b applied 9, still lagging %v", lag)
	}
	cancel()
	b.Close()
	waitPeers(t, a, "gw-b", -1)
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if lag := a.WaitApplied(ctx, 100); lag != nil {
		t.Fatalf("a closed gateway is still waited for: %v", lag)
	}
}

func waitPeers(t *testing.T, st *store.Etcd, id string, applied int64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		r, ok := st.Peers()[id]
		if (applied < 0 && !ok) || (ok && r == applied) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("peer %s never showed applied %d: %v", id, applied, st.Peers())
}

// A watch from a compacted revision says so, and a snapshot then gives
// what is needed to go on.
func TestEtcdCompacted(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	st := openEtcd(t, e, "gw-a", "/aegis/")
	ctx := context.Background()
	rev, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "alice"), IfModRev: -1}})
	if err != nil {
		t.Fatal(err)
	}
	rev2, err := st.Txn(ctx, []store.Op{{Record: store.Record{Key: key(1)}, Delete: true, IfModRev: -1}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rawClient(t, e).Compact(ctx, rev2); err != nil {
		t.Fatal(err)
	}
	b := <-st.Watch(ctx, rev-1)
	if !errors.Is(b.Err, store.ErrCompacted) {
		t.Fatalf("watch from compacted revision %d: %+v", rev-1, b)
	}
	snap, err := st.Snapshot(ctx)
	if err != nil || len(snap.Entries) != 0 || snap.Rev < rev2 {
		t.Fatalf("snapshot after compaction: %+v, %v", snap, err)
	}
}

// With etcd gone, writes and probes fail with ErrUnavailable within the
// request timeout, and work again once it is back.
func TestEtcdUnavailable(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	st := openEtcd(t, e, "gw-a", "/aegis/")
	ctx := context.Background()
	if err := st.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	e.Kill(0)
	start := time.Now()
	if _, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "alice"), IfModRev: -1}}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("write with etcd down: %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("write with etcd down took %v", d)
	}
	if err := st.Probe(ctx); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("probe with etcd down: %v", err)
	}
	if _, err := st.Snapshot(ctx); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("snapshot with etcd down: %v", err)
	}
	e.Restart(0)
	e.WaitHealthy(t)
	deadline := time.Now().Add(20 * time.Second)
	for st.Probe(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatal("probe still failing after etcd came back")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := st.Txn(ctx, []store.Op{{Record: rec(key(1), "alice"), IfModRev: -1}}); err != nil {
		t.Fatalf("write after etcd came back: %v", err)
	}
	_ = strings.TrimSpace
}

// A snapshot says how many sessions it is about to read before it reads
// them: every key under sessions/, a malformed one too.
func TestEtcdSnapshotSize(t *testing.T) {
	e := tu.StartEtcdLocal(t)
	ctx := context.Background()
	ca, cert, keyFile := e.ClientTLS()
	conf, err := store.TLSConfig(ca, cert, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var sizes []int
	st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: e.Endpoints(), TLS: conf, Prefix: "/aegis/", Gateway: "gw-a",
		Log: zerolog.New(zerolog.NewTestWriter(t)), SnapshotSize: func(n int) { sizes = append(sizes, n) }})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var ops []store.Op
	for i := range 10 {
		ops = append(ops, store.Op{Record: rec(key(i), "u"), IfModRev: -1})
	}
	if _, err := st.Txn(ctx, ops); err != nil {
		t.Fatal(err)
	}
	if _, err := rawClient(t, e).Put(ctx, "/aegis/sessions/x", "{}"); err != nil {
		t.Fatal(err)
	}
	snap, err := st.Snapshot(ctx)
	if err != nil || len(snap.Entries) != 10 || !slices.Equal(sizes, []int{11}) {
		t.Fatalf("snapshot of %d sessions (%v), sizes told %v; want 10 and [11]", len(snap.Entries), err, sizes)
	}
}
