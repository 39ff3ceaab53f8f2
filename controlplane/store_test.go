package controlplane_test

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

func openFileStore(t *testing.T, path string) store.Store {
	t.Helper()
	st, err := store.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func openEtcdStore(t testing.TB, e *tu.Etcd, id string) *store.Etcd {
	t.Helper()
	ca, cert, key := e.ClientTLS()
	conf, err := store.TLSConfig(ca, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenEtcd(store.EtcdOptions{Endpoints: e.Endpoints(), TLS: conf, Prefix: "/aegis/", Gateway: id,
		LeaseTTL: 3 * time.Second, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !hasLabel(m, labels[i], labels[i+1]) {
					continue next
				}
			}
			switch {
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

func eventually(t *testing.T, what string, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func grantReq(user, src string, idle, lifetime time.Duration) *agentv1.LoginEventRequest {
	r := &agentv1.LoginEventRequest{User: user, SrcIp: src, DstIp: "198.51.100.1", DstPort: 22, IdleTimeout: durationOf(idle)}
	if lifetime > 0 {
		r.MaxLifetime = durationOf(lifetime)
	}
	return r
}

func tcpKey(src string) state.Key {
	return state.Key{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr("198.51.100.1"), Port: 22, Proto: state.TCP}
}

// near reports whether two data-path stamps are within tol of each other.
func near(a, b uint64, tol time.Duration) bool {
	d := time.Duration(int64(a - b))
	return d < tol && d > -tol
}

// A gateway with a file store restarts on new, empty maps (an unload and
// a load, as after a reboot) and every session is back with its lifetime
// and idle time; a downtime counts as idle time; a revoke stays revoked.
func TestStoreFileRestore(t *testing.T) {
	tu.RequireKernel(t)
	path := filepath.Join(t.TempDir(), "sessions.db")
	opts := func() envOptions {
		return envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour, defIdle: time.Hour}
	}
	e := newEnv(t, opts())
	agent, compat := e.controller()
	if _, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.10", 10*time.Minute, time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := compat.SubmitSession(ctx(t), &session.LoginEvent{SrcIp: 0xC000020B, DstIp: 0xC6336401, DstPort: 443, Activate: true}); err != nil {
		t.Fatal(err)
	}
	alice := tcpKey("192.0.2.10")
	bob := state.Key{Src: netip.MustParseAddr("192.0.2.11"), Dst: netip.MustParseAddr("198.51.100.1"), Port: 443, Proto: state.Any}
	before := e.dump()
	if len(before) != 2 {
		t.Fatalf("maps hold %v", before)
	}
	e.stop()

	check := func(what string, e *env, downtime time.Duration) map[state.Key]state.Session {
		t.Helper()
		after := e.dump()
		for k, a := range after {
			b := before[k]
			shift := uint64(downtime)
			if a.User != b.User || a.IdleTimeout != b.IdleTimeout {
				t.Errorf("%s: %v is %+v, was %+v", what, k, a, b)
			}
			// Converted to wall time and back at another instant: equal
			// to within the coarse clock's tick and the time between the
			// two clocks' reads, which a loaded machine may stretch.
			const tol = 250 * time.Millisecond
			if !near(a.LastSeen, b.LastSeen-shift, tol) || !near(a.Created, b.Created-shift, tol) {
				t.Errorf("%s: %v last seen %d created %d, want %d and %d (downtime %v)", what, k, a.LastSeen, a.Created, b.LastSeen-shift, b.Created-shift, downtime)
			}
			if b.Expires != 0 && !near(a.Expires, b.Expires-shift, tol) {
				t.Errorf("%s: %v expires %d, want %d", what, k, a.Expires, b.Expires-shift)
			}
		}
		return after
	}

	// Restarted on new pins: both sessions back, with the same times.
	e = newEnv(t, opts())
	if got := check("restart", e, 0); len(got) != 2 {
		t.Fatalf("restart restored %d sessions, want 2", len(got))
	}
	if s := e.dump()[alice]; s.IdleLeft(time.Hour, state.Now()) < 9*time.Minute {
		l := s.IdleLeft(time.Hour, state.Now())
		t.Errorf("alice has %v idle left after a restart, want about 10m", l)
	}
	e.stop()

	// A reboot that took four minutes: the wall clock ran on while the
	// data path's clock started again. Four minutes less idle time left.
	if err := store.ShiftTimes(path, 4*time.Minute); err != nil {
		t.Fatal(err)
	}
	e = newEnv(t, opts())
	got := check("reboot", e, 4*time.Minute)
	if len(got) != 2 {
		t.Fatalf("reboot restored %d sessions, want 2", len(got))
	}
	ga := got[alice]
	if l := ga.IdleLeft(time.Hour, state.Now()); l > 6*time.Minute+time.Second || l < 5*time.Minute {
		t.Errorf("alice has %v idle left after a 4m reboot, want about 6m", l)
	}
	if l := ga.TimeLeft(time.Hour, state.Now()); l > 6*time.Minute+time.Second {
		t.Errorf("alice has %v left", l)
	}
	// Revoked, then restarted: stays revoked.
	if _, err := compat.SubmitSession(ctx(t), &session.LoginEvent{SrcIp: 0xC000020B, DstIp: 0xC6336401, DstPort: 443}); err == nil {
		t.Fatal("the old client connection still works") // the env's server is new
	}
	_, compat = e.controller()
	if _, err := compat.SubmitSession(ctx(t), &session.LoginEvent{SrcIp: 0xC000020B, DstIp: 0xC6336401, DstPort: 443}); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.dump()[bob]; ok {
		t.Fatal("revoked session still in the maps")
	}
	e.stop()

	// Another seven minutes down: alice (10m idle) is past it and not
	// restored.
	if err := store.ShiftTimes(path, 7*time.Minute); err != nil {
		t.Fatal(err)
	}
	e = newEnv(t, opts())
	if got := e.dump(); len(got) != 0 {
		t.Fatalf("after 11 minutes down and a revoke the maps hold %v", got)
	}
}

// The file store keeps the activity: a session that passed traffic is
// restored as idle as it really was, not as idle as at its grant.
func TestStoreFileActivity(t *testing.T) {
	tu.RequireKernel(t)
	path := filepath.Join(t.TempDir(), "sessions.db")
	e := newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
	agent, _ := e.controller()
	if _, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.10", 10*time.Minute, 0)); err != nil {
		t.Fatal(err)
	}
	k := tcpKey("192.0.2.10")
	m := e.maps()
	granted, err := m.Lookup(k)
	if err != nil {
		t.Fatal(err)
	}
	// A packet two seconds after the grant, as the data path stamps it.
	time.Sleep(2 * time.Second)
	now := state.Now()
	if ok, err := m.Touch(k, now, uint64(time.Minute), now); err != nil || !ok {
		t.Fatalf("stamp last_seen: %v, %v", ok, err)
	}
	controlplane.PublishAndReap(e.srv)
	e.stop()
	e = newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
	got := e.dump()[k]
	if !near(got.LastSeen, now, 250*time.Millisecond) {
		t.Fatalf("restored last seen %d, want the packet's %d (the grant's was %d)", got.LastSeen, now, granted.LastSeen)
	}
}

// Two gateways on one etcd: once a grant through one returns OK, the
// other's maps hold it; once a revoke through the other returns OK, the
// first's do not. A live gateway that does not apply makes a write wait
// for --store-ack-timeout, then it is acknowledged and counted.
func TestStoreEtcdAck(t *testing.T) {
	tu.RequireKernel(t)
	etcd := tu.StartEtcdLocal(t)
	a := newEnv(t, envOptions{store: openEtcdStore(t, etcd, "gw-a"), gateway: "gw-a", ackTimeout: 700 * time.Millisecond})
	b := newEnv(t, envOptions{store: openEtcdStore(t, etcd, "gw-b"), gateway: "gw-b", ackTimeout: 700 * time.Millisecond})
	eventually(t, "gw-a sees gw-b", 10*time.Second, func() bool { return metricValue(t, a.reg, "aegis_store_peers") == 1 })
	agentA, _ := a.controller()
	agentB, _ := b.controller()
	mb, ma := b.maps(), a.maps()
	for i := range 20 {
		src := netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}).String()
		if _, err := agentA.LoginEvent(ctx(t), grantReq("alice", src, time.Minute, 0)); err != nil {
			t.Fatal(err)
		}
		if _, err := mb.Lookup(tcpKey(src)); err != nil {
			t.Fatalf("grant %d through gw-a acknowledged, gw-b's maps: %v", i, err)
		}
		if _, err := agentB.LogoutEvent(ctx(t), &agentv1.LogoutEventRequest{SrcIp: src, DstIp: "198.51.100.1", DstPort: 22}); err != nil {
			t.Fatal(err)
		}
		if _, err := ma.Lookup(tcpKey(src)); !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("revoke %d through gw-b acknowledged, gw-a's maps: %v", i, err)
		}
	}
	if n := metricValue(t, a.reg, "aegis_store_ack_timeouts_total"); n != 0 {
		t.Fatalf("%v ack timeouts with every gateway applying", n)
	}

	// A gateway that is live (its key is there) but applies nothing.
	stuck := openEtcdStore(t, etcd, "gw-stuck")
	stuck.SetApplied(1)
	eventually(t, "gw-a sees gw-stuck", 10*time.Second, func() bool { return metricValue(t, a.reg, "aegis_store_peers") == 2 })
	start := time.Now()
	if _, err := agentA.LoginEvent(ctx(t), grantReq("alice", "192.0.2.99", time.Minute, 0)); err != nil {
		t.Fatalf("grant with a lagging gateway: %v", err)
	}
	if d := time.Since(start); d < 700*time.Millisecond {
		t.Errorf("grant with a lagging gateway returned after %v, before the ack timeout", d)
	}
	if n := metricValue(t, a.reg, "aegis_store_ack_timeouts_total"); n != 1 {
		t.Errorf("aegis_store_ack_timeouts_total %v, want 1", n)
	}
	if !strings.Contains(a.logs.String(), `"lagging_gateways":["gw-stuck"]`) {
		t.Errorf("the ack timeout's log line does not name gw-stuck")
	}
	// Gone (its lease revoked on close): not waited for.
	stuck.Close()
	eventually(t, "gw-a forgets gw-stuck", 10*time.Second, func() bool { return metricValue(t, a.reg, "aegis_store_peers") == 1 })
	if _, err := agentA.LoginEvent(ctx(t), grantReq("alice", "192.0.2.98", time.Minute, 0)); err != nil {
		t.Fatal(err)
	}
	if n := metricValue(t, a.reg, "aegis_store_ack_timeouts_total"); n != 1 {
		t.Errorf("aegis_store_ack_timeouts_total %v after the laggard left, want still 1", n)
	}
}

func healthOf(t *testing.T, e *env, service string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	resp, err := healthpb.NewHealthClient(e.dial(e.client("controller"))).Check(ctx(t), &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatus()
}

// etcd unreachable: grants and revokes refused with Unavailable, the maps
// keep what they hold, health NOT_SERVING, aegis_store_up 0. Back: a
// resync, and a session revoked meanwhile (through another gateway) is
// not resurrected.
func TestStoreEtcdPartition(t *testing.T) {
	tu.RequireKernel(t)
	etcd := tu.StartEtcdLocal(t)
	e := newEnv(t, envOptions{store: openEtcdStore(t, etcd, "gw-a"), gateway: "gw-a", refresh: 200 * time.Millisecond})
	agent, compat := e.controller()
	for _, src := range []string{"192.0.2.10", "192.0.2.11"} {
		if _, err := agent.LoginEvent(ctx(t), grantReq("alice", src, time.Hour, 0)); err != nil {
			t.Fatal(err)
		}
	}
	svc := agentv1.AgentService_ServiceDesc.ServiceName
	eventually(t, "SERVING", 5*time.Second, func() bool { return healthOf(t, e, svc) == healthpb.HealthCheckResponse_SERVING })

	etcd.Kill(0)
	// At once, before the probe may have noticed: a grant this gateway
	// would refuse (alice holds the key) and a revoke of nothing are
	// still Unavailable, not answers from a view that may be stale.
	if _, err := agent.LoginEvent(ctx(t), grantReq("bob", "192.0.2.10", time.Hour, 0)); status.Code(err) != codes.Unavailable {
		t.Fatalf("conflicting grant right after etcd went down: %v, want Unavailable", err)
	}
	_, err := agent.LogoutEvent(ctx(t), &agentv1.LogoutEventRequest{SrcIp: "192.0.2.99", DstIp: "198.51.100.1", DstPort: 22})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("revoke of nothing right after etcd went down: %v, want Unavailable", err)
	}
	eventually(t, "aegis_store_up 0", 10*time.Second, func() bool { return metricValue(t, e.reg, "aegis_store_up") == 0 })
	eventually(t, "NOT_SERVING", 5*time.Second, func() bool {
		return healthOf(t, e, svc) == healthpb.HealthCheckResponse_NOT_SERVING &&
			healthOf(t, e, session.SessionManager_ServiceDesc.ServiceName) == healthpb.HealthCheckResponse_NOT_SERVING
	})
	_, err = agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.12", time.Hour, 0))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("grant with etcd down: %v, want Unavailable", err)
	}
	_, err = agent.LogoutEvent(ctx(t), &agentv1.LogoutEventRequest{SrcIp: "192.0.2.10", DstIp: "198.51.100.1", DstPort: 22})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("revoke with etcd down: %v, want Unavailable", err)
	}
	_, err = compat.SubmitSession(ctx(t), &session.LoginEvent{SrcIp: 0xC000020C, DstIp: 0xC6336401, DstPort: 22, Activate: true})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("compat grant with etcd down: %v, want Unavailable", err)
	}
	// Fail static: the maps still hold both, and nothing else.
	got := e.dump()
	if len(got) != 2 {
		t.Fatalf("maps with etcd down: %v", got)
	}

	etcd.Restart(0)
	etcd.WaitHealthy(t)
	// Revoked through another gateway before this one is back.
	raw, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), TLS: etcd.ClientConfig(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := raw.Delete(rctx, "/aegis/sessions/192.0.2.11/198.51.100.1/22/6"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "aegis_store_up 1", 15*time.Second, func() bool { return metricValue(t, e.reg, "aegis_store_up") == 1 })
	eventually(t, "SERVING again", 10*time.Second, func() bool { return healthOf(t, e, svc) == healthpb.HealthCheckResponse_SERVING })
	eventually(t, "the revoke applied", 10*time.Second, func() bool {
		_, ok := e.dump()[tcpKey("192.0.2.11")]
		return !ok
	})
	if metricValue(t, e.reg, "aegis_store_resyncs_total", "reason", "requested") < 1 {
		t.Error("no resync after the store came back")
	}
	if _, ok := e.dump()[tcpKey("192.0.2.10")]; !ok {
		t.Fatal("a session the store holds is gone")
	}
	if _, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.12", time.Hour, 0)); err != nil {
		t.Fatalf("grant after etcd came back: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	if _, ok := e.dump()[tcpKey("192.0.2.11")]; ok {
		t.Fatal("the revoked session came back")
	}
}

// compactingStore makes the first watch start from a revision etcd has
// compacted away, as a gateway that was cut off for long finds.
type compactingStore struct {
	*store.Etcd
	first bool
}

func (c *compactingStore) Watch(ctx context.Context, rev int64) <-chan store.Batch {
	if !c.first {
		c.first = true
		rev = 1
	}
	return c.Etcd.Watch(ctx, rev)
}

func TestStoreEtcdCompactedResync(t *testing.T) {
	tu.RequireKernel(t)
	etcd := tu.StartEtcdLocal(t)
	raw, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), TLS: etcd.ClientConfig(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := context.Background()
	// History: a session granted, another granted and revoked, then
	// compacted.
	other := openEtcdStore(t, etcd, "gw-other")
	now := time.Now().UnixNano()
	for _, src := range []string{"192.0.2.10", "192.0.2.11"} {
		if _, err := other.Txn(c, []store.Op{{Record: store.Record{Key: tcpKey(src), User: "alice", Created: now, LastSeen: now, IdleTimeout: time.Hour}, IfModRev: -1}}); err != nil {
			t.Fatal(err)
		}
	}
	rev, err := other.Txn(c, []store.Op{{Record: store.Record{Key: tcpKey("192.0.2.11")}, Delete: true, IfModRev: -1}})
	if err != nil {
		t.Fatal(err)
	}
	other.Close()
	if _, err := raw.Compact(c, rev); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, envOptions{store: &compactingStore{Etcd: openEtcdStore(t, etcd, "gw-a")}, gateway: "gw-a"})
	eventually(t, "a resync after compaction", 10*time.Second, func() bool {
		return metricValue(t, e.reg, "aegis_store_resyncs_total", "reason", "compacted") == 1
	})
	agent, _ := e.controller()
	eventually(t, "serving after the resync", 10*time.Second, func() bool {
		_, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.12", time.Hour, 0))
		return err == nil
	})
	got := e.dump()
	if _, ok := got[tcpKey("192.0.2.11")]; ok || len(got) != 2 {
		t.Fatalf("after a compacted watch and a resync the maps hold %v", got)
	}
}

// A grant that lands between the store reaping's judgment (expired) and
// its delete survives: the delete is conditioned on the revision judged.
// Without the condition, the fresh grant is deleted.
func TestStoreReapVersusRegrant(t *testing.T) {
	tu.RequireKernel(t)
	for _, unconditional := range []bool{false, true} {
		name := "conditional"
		if unconditional {
			name = "unconditional"
		}
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "sessions.db")
			e := newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
			agent, _ := e.controller()
			if _, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.10", time.Second, 0)); err != nil {
				t.Fatal(err)
			}
			time.Sleep(3500 * time.Millisecond) // idle past 1 s and the reaping's grace
			regranted := false
			controlplane.SetBeforeReapTxn(e.srv, func() {
				if _, err := agent.LoginEvent(ctx(t), grantReq("alice", "192.0.2.10", time.Hour, 0)); err != nil {
					t.Error(err)
				}
				regranted = true
			})
			if unconditional {
				controlplane.SetReapUnconditional(e.srv)
			}
			controlplane.PublishAndReap(e.srv)
			if !regranted {
				t.Fatal("the reaping judged nothing expired")
			}
			time.Sleep(100 * time.Millisecond)
			_, live := e.dump()[tcpKey("192.0.2.10")]
			if live == unconditional {
				t.Fatalf("re-granted session in the maps: %v (unconditional delete: %v)", live, unconditional)
			}
		})
	}
}

// IpChange with a store moves the stored sessions: a swap swaps, in the
// maps and in the store (a restart restores the moved sessions).
func TestStoreIpChangeSwap(t *testing.T) {
	tu.RequireKernel(t)
	path := filepath.Join(t.TempDir(), "sessions.db")
	e := newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
	agent, compat := e.controller()
	a, b := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	for _, r := range []*agentv1.LoginEventRequest{
		{User: "alice", SrcIp: "192.0.2.10", DstIp: a.String(), DstPort: 22},
		{User: "bob", SrcIp: "192.0.2.10", DstIp: b.String(), DstPort: 22},
		{User: "carol", SrcIp: "192.0.2.11", DstIp: a.String(), DstPort: 22},
	} {
		if _, err := agent.LoginEvent(ctx(t), r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := compat.IpChange(ctx(t), &session.IpChangeList{IpChanges: []*session.IpChangeEvent{
		{OldIp: 0xC6336401, NewIp: 0xC6336402}, {OldIp: 0xC6336402, NewIp: 0xC6336401}}}); err != nil {
		t.Fatal(err)
	}
	k := func(src string, dst netip.Addr) state.Key {
		return state.Key{Src: netip.MustParseAddr(src), Dst: dst, Port: 22, Proto: state.TCP}
	}
	want := map[state.Key]string{k("192.0.2.10", b): "alice", k("192.0.2.10", a): "bob", k("192.0.2.11", b): "carol"}
	check := func(what string) {
		t.Helper()
		got := e.dump()
		if len(got) != len(want) {
			t.Fatalf("%s: %v", what, got)
		}
		for key, user := range want {
			if got[key].User != user {
				t.Fatalf("%s: %v is %q's, want %q's", what, key, got[key].User, user)
			}
		}
	}
	check("after the swap")
	e.stop()
	e = newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
	check("restored after the swap")
}

// Revokes are final against everything that deletes concurrently: grants
// and revokes through the store race the reaper's sweeps of the maps and
// the control plane's reaping of the store, on sessions at the edge of
// expiry. At the end no revoked session is in the maps or the store, and
// every acknowledged grant not revoked is in both.
func TestStoreRevokeVersusSweep(t *testing.T) {
	tu.RequireKernel(t)
	path := filepath.Join(t.TempDir(), "sessions.db")
	e := newEnv(t, envOptions{store: openFileStore(t, path), gateway: "gw", activityInterval: time.Hour})
	agent, _ := e.controller()
	m := e.maps()
	stop := make(chan struct{})
	done := make(chan struct{}, 2)
	var stopOnce sync.Once
	halt := func() {
		stopOnce.Do(func() {
			close(stop)
			<-done
			<-done
		})
	}
	t.Cleanup(halt) // before the maps close: cleanups run last first
	go func() {
		sw := state.NewSweeper()
		for {
			select {
			case <-stop:
				done <- struct{}{}
				return
			default:
			}
			if _, err := sw.Sweep(context.Background(), m, nil); err != nil {
				t.Error(err)
			}
		}
	}()
	go func() {
		for {
			select {
			case <-stop:
				done <- struct{}{}
				return
			default:
			}
			controlplane.PublishAndReap(e.srv)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	src := func(i int) string { return netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}).String() }
	const keys, rounds = 20, 15
	for r := range rounds {
		for i := range keys {
			// 1 s idle: expired, swept and reaped while the rounds go on.
			if _, err := agent.LoginEvent(ctx(t), grantReq("alice", src(i), time.Second, 0)); err != nil {
				t.Fatalf("round %d grant %d: %v", r, i, err)
			}
		}
		time.Sleep(time.Duration(r%4) * 400 * time.Millisecond)
		for i := range keys {
			if i%2 == 0 {
				_, err := agent.LogoutEvent(ctx(t), &agentv1.LogoutEventRequest{SrcIp: src(i), DstIp: "198.51.100.1", DstPort: 22})
				if err != nil && status.Code(err) != codes.NotFound {
					t.Fatalf("round %d revoke %d: %v", r, i, err)
				}
			}
		}
	}
	// The last grants, long-lived: they must all stay.
	for i := range keys {
		if i%2 == 1 {
			if _, err := agent.LoginEvent(ctx(t), grantReq("alice", src(i), time.Hour, 0)); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(300 * time.Millisecond)
	halt()
	got := e.dump()
	for i := range keys {
		_, ok := got[tcpKey(src(i))]
		if ok != (i%2 == 1) {
			t.Errorf("session %d in the maps: %v, want %v", i, ok, i%2 == 1)
		}
	}
	e.stop()
	st := openFileStore(t, path)
	defer st.Close()
	snap, err := st.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Entries) != keys/2 {
		t.Errorf("the store holds %d sessions, want %d", len(snap.Entries), keys/2)
	}
	for _, en := range snap.Entries {
		if en.IdleTimeout != time.Hour {
			t.Errorf("the store holds %v with idle %v", en.Key, en.IdleTimeout)
		}
	}
}

// Traffic through gateway A keeps the session live on gateway B, where it
// passes nothing: A publishes its activity every interval and B raises its
// last_seen. A session with no traffic anywhere expires on both.
func TestStoreEtcdActivityKeepsPeersLive(t *testing.T) {
	tu.RequireKernel(t)
	etcd := tu.StartEtcdLocal(t)
	const interval = 300 * time.Millisecond
	a := newEnv(t, envOptions{store: openEtcdStore(t, etcd, "gw-a"), gateway: "gw-a", activityInterval: interval})
	b := newEnv(t, envOptions{store: openEtcdStore(t, etcd, "gw-b"), gateway: "gw-b", activityInterval: interval})
	eventually(t, "gw-a sees gw-b", 10*time.Second, func() bool { return metricValue(t, a.reg, "aegis_store_peers") == 1 })
	agentA, _ := a.controller()
	const idle = 3 * time.Second
	busy, quiet := tcpKey("192.0.2.10"), tcpKey("192.0.2.11")
	for _, src := range []string{"192.0.2.10", "192.0.2.11"} {
		if _, err := agentA.LoginEvent(ctx(t), grantReq("alice", src, idle, 0)); err != nil {
			t.Fatal(err)
		}
	}
	ma, mb := a.maps(), b.maps()
	// Twice the idle timeout of traffic through A only, stamped as the
	// data path does.
	for end := time.Now().Add(2 * idle); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		now := state.Now()
		if _, err := ma.Touch(busy, now, uint64(time.Hour), now); err != nil {
			t.Fatal(err)
		}
	}
	now := state.Now()
	sb, err := mb.Lookup(busy)
	if err != nil {
		t.Fatalf("gw-b lost the busy session: %v", err)
	}
	if r := sb.Verdict(time.Hour, now); !r.Pass() {
		t.Fatalf("the session busy on gw-a is %v on gw-b (idle %v there)", r, time.Duration(int64(now-sb.LastSeen)))
	}
	if metricValue(t, b.reg, "aegis_store_activity_touched_total") == 0 {
		t.Error("gw-b counted no activity touch")
	}
	for name, m := range map[string]*state.Maps{"gw-a": ma, "gw-b": mb} {
		if s, err := m.Lookup(quiet); err == nil && s.Verdict(time.Hour, now).Pass() {
			t.Errorf("%s: the quiet session is still live after %v", name, 2*idle)
		}
	}
}
