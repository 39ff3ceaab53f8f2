package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/proto/session"
)

// grpcDefaultMaxRecv is what a gRPC client accepts by default
// (MaxCallRecvMsgSize), the existing controller's limit.
const grpcDefaultMaxRecv = 4 * 1024 * 1024

// defaultCapacity is the sessions maps' size in the build.
const defaultCapacity = 262144

// The encoding is byte for byte what proto.Marshal makes, and the largest
// entry is MaxCompatEntrySize.
func TestCompatEncodingMatchesProto(t *testing.T) {
	worst := &session.Session{SrcIp: math.MaxUint32, DstIp: math.MaxUint32, DstPort: 65535, TimeLeft: math.MaxInt32}
	one, _ := proto.Marshal(&session.SessionList{Sessions: []*session.Session{worst}})
	if len(one) != controlplane.MaxCompatEntrySize || controlplane.CompatEntrySize(worst) != len(one) {
		t.Fatalf("worst-case entry is %d bytes (computed %d), MaxCompatEntrySize %d", len(one), controlplane.CompatEntrySize(worst), controlplane.MaxCompatEntrySize)
	}
	r := rand.New(rand.NewPCG(1, 2))
	var entries []controlplane.CompatEntry
	want := &session.SessionList{}
	for i := range 5000 {
		// Every varint length of every field, 0 (absent) time_left included.
		e := controlplane.CompatEntry{Src: uint32(i+1) << (r.IntN(4) * 8), Dst: r.Uint32() >> r.IntN(32), Port: uint16(1 + r.IntN(65535)),
			Left: int32(r.Uint32() >> (1 + r.IntN(31)))}
		if i%7 == 0 {
			e.Left = 0
		}
		entries = append(entries, e)
	}
	slices.SortFunc(entries, func(a, b controlplane.CompatEntry) int {
		if a.Src != b.Src {
			return int(int64(a.Src) - int64(b.Src))
		}
		return int(int64(a.Dst) - int64(b.Dst))
	})
	for _, e := range entries {
		want.Sessions = append(want.Sessions, &session.Session{SrcIp: e.Src, DstIp: e.Dst, DstPort: uint32(e.Port), TimeLeft: e.Left})
	}
	got, kept := controlplane.EncodeCompat(entries, math.MaxInt)
	wantBytes, _ := proto.MarshalOptions{Deterministic: true}.Marshal(want)
	if kept != len(entries) || !bytes.Equal(got, wantBytes) {
		t.Fatalf("encoding of %d entries differs from proto.Marshal (kept %d, %d vs %d bytes)", len(entries), kept, len(got), len(wantBytes))
	}
}

// A full map of the default capacity, one entry per session, in the worst
// case of every field and in the usual one: the snapshot stays within
// 4 MiB by keeping the most recently active sessions, exactly as many as
// fit, and decodes as a standard session.SessionList.
func TestCompatSnapshotOfFullMapFits(t *testing.T) {
	for _, tc := range []struct {
		name      string
		port      uint16
		left      int32
		entrySize int
	}{
		{"worst case", 65535, math.MaxInt32, 24},
		{"usual", 8080, 60, 19},
	} {
		t.Run(tc.name, func(t *testing.T) {
			entries := make([]controlplane.CompatEntry, defaultCapacity)
			for i := range entries {
				// Addresses from 192.0.2.0: 5-byte varints. Most recently
				// active: the odd ones.
				entries[i] = controlplane.CompatEntry{Src: 0xC0000200 + uint32(i>>8), Dst: 0xC6336400 + uint32(i&255),
					Port: tc.port, Left: tc.left, LastSeen: uint64(i%2)*1e12 + uint64(i)}
			}
			data, kept := controlplane.EncodeCompat(entries, grpcDefaultMaxRecv)
			if len(data) > grpcDefaultMaxRecv {
				t.Fatalf("snapshot of %d sessions is %d bytes, over %d", defaultCapacity, len(data), grpcDefaultMaxRecv)
			}
			if want := grpcDefaultMaxRecv / tc.entrySize; kept != want || len(data) != kept*tc.entrySize {
				t.Fatalf("kept %d entries in %d bytes, want %d of %d bytes", kept, len(data), want, tc.entrySize)
			}
			var list session.SessionList
			if err := proto.Unmarshal(data, &list); err != nil || len(list.GetSessions()) != kept {
				t.Fatalf("decode: %v, %d sessions", err, len(list.GetSessions()))
			}
			// The kept ones are the most recently active: all the odd
			// ones, then the newest even ones; in key order.
			for i, s := range list.GetSessions() {
				idx := int(s.GetSrcIp()-0xC0000200)<<8 | int(s.GetDstIp()-0xC6336400)
				if idx%2 == 0 && idx < 2*(defaultCapacity-kept) {
					t.Fatalf("entry %d (session %d, less recently active) kept over more recent ones", i, idx)
				}
				if i > 0 && s.GetSrcIp() < list.GetSessions()[i-1].GetSrcIp() {
					t.Fatalf("entry %d out of key order", i)
				}
			}
		})
	}
	// A TCP+UDP pair per compat grant is one entry: a map full of pairs
	// fits whole even in the worst case.
	pairs := make([]controlplane.CompatEntry, defaultCapacity/2)
	for i := range pairs {
		pairs[i] = controlplane.CompatEntry{Src: 0xC0000200 + uint32(i>>8), Dst: 0xC6336400 + uint32(i&255), Port: 65535, Left: math.MaxInt32}
	}
	if _, kept := controlplane.EncodeCompat(pairs, grpcDefaultMaxRecv); kept != len(pairs) {
		t.Fatalf("a full map of pairs: %d of %d entries kept", kept, len(pairs))
	}
}

// The real thing: a full sessions_v4 of the default capacity, a real gRPC
// client over TLS with default call options (4 MiB receive limit) gets the
// snapshot, cut to what fits, the most recently active sessions included;
// the cut is counted.
func TestMonitorSessionsFullMapDefaultClient(t *testing.T) {
	e := newEnv(t, envOptions{defIdle: time.Minute})
	now := state.Now()
	tu.FillSessionsV4(t, e.pin, defaultCapacity, "bulk", now-uint64(10*time.Second))
	// 1000 sessions active just now: they must be in the snapshot.
	m := e.maps()
	recent := make(map[[3]uint32]bool)
	for i := 0; i < defaultCapacity; i += defaultCapacity / 1000 {
		k := tu.FillKeyV4(i)
		if err := m.Grant(state.Session{Key: state.Key{Src: netip.AddrFrom4(k.Src), Dst: netip.AddrFrom4(k.Dst), Port: k.Dport, Proto: state.TCP},
			User: "recent", LastSeen: now, Created: now}); err != nil {
			t.Fatal(err)
		}
		recent[[3]uint32{ip4(netip.AddrFrom4(k.Src)), ip4(netip.AddrFrom4(k.Dst)), uint32(k.Dport)}] = true
	}
	if n4, _, _ := m.Count(); n4 != defaultCapacity {
		t.Fatalf("map holds %d sessions, want %d", n4, defaultCapacity)
	}
	_, compat := e.controller()
	stream, err := compat.MonitorSessions(ctx(t), &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := stream.Recv()
	if err != nil {
		t.Fatalf("receive the snapshot of a full map with a default client: %v", err)
	}
	// Sources 192.0.2.x and destinations 198.51.100.x take 5-byte
	// varints, ports 1024-1027 2, time_left 50-60 s 1: 19 bytes an entry.
	size := proto.Size(list)
	if want := grpcDefaultMaxRecv / 19; len(list.GetSessions()) != want || size > grpcDefaultMaxRecv {
		t.Fatalf("snapshot of %d sessions, %d bytes; want %d sessions within %d bytes", len(list.GetSessions()), size, want, grpcDefaultMaxRecv)
	}
	found := 0
	for _, s := range list.GetSessions() {
		if recent[[3]uint32{s.GetSrcIp(), s.GetDstIp(), s.GetDstPort()}] {
			found++
		}
	}
	if found != len(recent) {
		t.Fatalf("%d of the %d most recently active sessions in the snapshot", found, len(recent))
	}
	ms := gather(t, e)
	if got := value(t, ms, "aegis_controlplane_monitor_snapshot_omitted_sessions"); got != float64(defaultCapacity-len(list.GetSessions())) {
		t.Fatalf("omitted sessions metric %v, want %d", got, defaultCapacity-len(list.GetSessions()))
	}
	if !strings.Contains(e.logs.String(), "too large for one message") {
		t.Fatal("the cut is not logged")
	}
	t.Logf("full map: %d of %d sessions in a %d-byte snapshot, walk and encoding %.0f ms", len(list.GetSessions()), defaultCapacity, size,
		1000*value(t, ms, "aegis_controlplane_monitor_snapshot_seconds"))
}

// The 5th stream of one client, and the stream over the total cap, get
// ResourceExhausted; closing a stream frees its slot.
func TestMonitorSessionsCaps(t *testing.T) {
	e := newEnv(t, envOptions{interval: time.Hour, streams: 6})
	c := ctx(t)
	open := func(name string) (session.SessionManager_MonitorSessionsClient, func(), error) {
		cctx, cancel := context.WithCancel(c)
		s, err := session.NewSessionManagerClient(e.dial(e.client(name))).MonitorSessions(cctx, &session.Empty{})
		if err == nil {
			_, err = s.Recv()
		}
		return s, cancel, err
	}
	var cancels []func()
	for i := range controlplane.DefaultMonitorStreamsPerPeer {
		_, cancel, err := open("controller")
		if err != nil {
			t.Fatalf("stream %d: %v", i+1, err)
		}
		cancels = append(cancels, cancel)
	}
	_, _, err := open("controller")
	if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--monitor-max-streams-per-peer") {
		t.Fatalf("5th stream of one client: %v, want ResourceExhausted", err)
	}
	// Another client still may, up to the total of 6.
	for i := range 2 {
		if _, _, err := open("controller-2"); err != nil {
			t.Fatalf("stream %d of another client: %v", i+1, err)
		}
	}
	_, _, err = open("controller-3")
	if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--monitor-max-streams)") {
		t.Fatalf("stream over the total: %v, want ResourceExhausted", err)
	}
	ms := gather(t, e)
	if value(t, ms, "aegis_controlplane_monitor_streams_refused_total", "cap=peer") != 1 ||
		value(t, ms, "aegis_controlplane_monitor_streams_refused_total", "cap=total") != 1 {
		t.Fatal("refusals not counted by cap")
	}
	// A closed stream gives its slot back.
	cancels[0]()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _, err := open("controller")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot of a closed stream not freed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A client that does not read: its stream is dropped with a clear status
// and counted, the others go on, and its slot is held until gRPC lets go of
// what it queued for it (here: the connection closes).
func TestMonitorSessionsSlowReaderDropped(t *testing.T) {
	e := newEnv(t, envOptions{interval: 100 * time.Millisecond, sendTimeout: time.Second, defIdle: time.Hour})
	// 5,000 sessions: a snapshot of about 95 KB, more than the 64 KiB
	// HTTP/2 window of the slow client.
	const n = 5000
	tu.FillSessionsV4(t, e.pin, n, "bulk", state.Now())
	c := ctx(t)
	_, compat := e.controller()
	fast, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	// The reading stream reads throughout.
	var received atomic.Int64
	readErr := make(chan error, 1)
	go func() {
		for {
			l, err := fast.Recv()
			if err == nil && len(l.GetSessions()) != n {
				err = fmt.Errorf("%d sessions, want %d", len(l.GetSessions()), n)
			}
			if err != nil {
				readErr <- err
				return
			}
			received.Add(1)
		}
	}()
	slowConn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName: pki.ServerName, RootCAs: e.ca.CertPool(), Certificates: []tls.Certificate{e.client("slow")}})),
		// A fixed window: no BDP growth, so not reading stalls the stream.
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(16<<20))
	if err != nil {
		t.Fatal(err)
	}
	defer slowConn.Close()
	slow, err := session.NewSessionManagerClient(slowConn).MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); value(t, gather(t, e), "aegis_controlplane_monitor_streams_dropped_total") < 1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stream that does not read was not dropped within 10 s")
		}
	}
	if !strings.Contains(e.logs.String(), "MonitorSessions stream dropped") {
		t.Fatal("the drop is not logged")
	}
	// The reading stream goes on.
	for before := received.Load(); received.Load() < before+5; time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-readErr:
			t.Fatalf("reading stream: %v", err)
		default:
		}
	}
	if got := value(t, gather(t, e), "aegis_controlplane_monitor_streams_dropped_total"); got != 1 {
		t.Fatalf("%v streams dropped, want only the slow one", got)
	}
	// Its data is still queued: the slot is held.
	if got := value(t, gather(t, e), "aegis_controlplane_monitor_streams_draining"); got != 1 {
		t.Fatalf("draining streams %v, want 1", got)
	}
	// Reading now, the client gets what was queued, then the status.
	for {
		_, err := slow.Recv()
		if err == nil {
			continue
		}
		if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "has not read a snapshot") {
			t.Fatalf("the dropped stream ends with %v, want ResourceExhausted naming the cause", err)
		}
		break
	}
	for deadline := time.Now().Add(5 * time.Second); value(t, gather(t, e), "aegis_controlplane_monitor_streams_draining") != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the drained stream's slot is still held")
		}
	}
	if got := value(t, gather(t, e), "aegis_controlplane_monitor_streams"); got != 1 {
		t.Fatalf("%v stream slots taken, want the reading stream's only", got)
	}
}

// The snapshot clock: periods of interval ± 20 %, drawn anew each time, so
// that snapshot times drift off any fixed offset from a stream's opening;
// a write or a new stream brings the next snapshot forward, but not closer
// than the minimum gap to the last one.
func TestMonitorSchedule(t *testing.T) {
	const interval = 5 * time.Second
	r := rand.New(rand.NewPCG(7, 11))
	open := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := open
	offsets := map[time.Duration]bool{}
	var periods []time.Duration
	for range 100 {
		p := controlplane.Period(interval, r.Float64())
		if p < interval*8/10 || p > interval*12/10 {
			t.Fatalf("period %v outside interval ± 20 %%", p)
		}
		periods = append(periods, p)
		at = at.Add(p)
		offsets[at.Sub(open)%interval] = true
	}
	if len(offsets) < 90 {
		t.Fatalf("snapshot times take only %d distinct offsets from the stream's opening", len(offsets))
	}
	var sum time.Duration
	for _, p := range periods {
		sum += p
	}
	if mean := sum / time.Duration(len(periods)); mean < interval*95/100 || mean > interval*105/100 {
		t.Fatalf("mean period %v, want about %v", mean, interval)
	}
	if controlplane.Period(interval, 0) != interval*8/10 || controlplane.Period(interval, 0.5) != interval {
		t.Fatal("period is not interval ± 20 % of the random draw")
	}

	gap := controlplane.MonitorMinGap(interval)
	last := open
	due := open.Add(interval)
	// A write right after a snapshot: the next comes after the gap.
	if got := controlplane.Promptly(open.Add(10*time.Millisecond), last, due, gap); !got.Equal(open.Add(gap)) {
		t.Fatalf("prompt snapshot at %v, want after the gap %v", got.Sub(open), gap)
	}
	// Long after the last one: at once.
	if now := open.Add(3 * time.Second); !controlplane.Promptly(now, last, due, gap).Equal(now) {
		t.Fatal("prompt snapshot not at once")
	}
	// Never later than the one already due.
	if got := controlplane.Promptly(open.Add(4999*time.Millisecond), open.Add(4990*time.Millisecond), due, gap); !got.Equal(due) {
		t.Fatalf("prompt snapshot at %v, after the one due at %v", got.Sub(open), due.Sub(open))
	}
	// The first snapshot, with no stream before: at once.
	if !controlplane.Promptly(open, time.Time{}, time.Time{}, gap).Equal(open) {
		t.Fatal("first snapshot not at once")
	}
}

// One clock for every stream: a new stream gets the current snapshot at
// once, without a walk of its own.
func TestMonitorSessionsSharedClock(t *testing.T) {
	e := newEnv(t, envOptions{interval: time.Hour, perPeer: 10})
	_, compat := e.controller()
	c := ctx(t)
	first, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Recv(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		s, err := compat.MonitorSessions(c, &session.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	if n := value(t, gather(t, e), "aegis_controlplane_monitor_snapshots_total"); n != 1 {
		t.Fatalf("%v snapshots for 6 streams opened within an interval, want 1", n)
	}
}

// The controller race: a snapshot whose walk ran before an IpChange, and
// that would go out after the IpChange's reply, is not sent; the stream
// gets a snapshot taken after the move, promptly. Without the rule, the
// stale snapshot does go out: the test sees the race.
func TestMonitorSessionsNoSnapshotOlderThanAWrite(t *testing.T) {
	t.Run("rule", func(t *testing.T) {
		if stale := snapshotAfterIpChange(t, false); stale {
			t.Fatal("after the IpChange's reply the stream got a snapshot taken before it")
		}
	})
	t.Run("without the rule", func(t *testing.T) {
		if stale := snapshotAfterIpChange(t, true); !stale {
			t.Fatal("without the freshness rule the stale snapshot did not go out: the test does not see the race")
		}
	})
}

// snapshotAfterIpChange holds a walk that ran before an IpChange until the
// IpChange has been answered, then reports whether the next snapshot the
// stream receives still shows the session at its old destination.
func snapshotAfterIpChange(t *testing.T, sendStale bool) bool {
	walked := make(chan struct{})
	proceed := make(chan struct{})
	var hold atomic.Bool
	e := newEnv(t, envOptions{interval: time.Hour, setup: func(s *controlplane.Server) {
		controlplane.SetAfterWalk(s, func() {
			if hold.CompareAndSwap(true, false) {
				walked <- struct{}{}
				<-proceed
			}
		})
		if sendStale {
			controlplane.SendStaleSnapshots(s)
		}
	}})
	_, compat := e.controller()
	c := ctx(t)
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(client4), DstIp: ip4(svcA4), DstPort: 8080, Activate: true}); err != nil {
		t.Fatal(err)
	}
	stream, err := compat.MonitorSessions(c, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if l, err := stream.Recv(); err != nil || len(l.GetSessions()) != 1 || l.GetSessions()[0].GetDstIp() != ip4(svcA4) {
		t.Fatalf("first snapshot: %v %v", l, err)
	}
	// A compat write makes the clock walk; the walk is held before its
	// snapshot is published, while the IpChange is applied and answered.
	hold.Store(true)
	if _, err := compat.SubmitSession(c, &session.LoginEvent{SrcIp: ip4(other4), DstIp: ip4(svcB4), DstPort: 22, Activate: true}); err != nil {
		t.Fatal(err)
	}
	<-walked
	newA := netip.MustParseAddr("198.51.100.30")
	if _, err := compat.IpChange(c, &session.IpChangeList{IpChanges: []*session.IpChangeEvent{{OldIp: ip4(svcA4), NewIp: ip4(newA)}}}); err != nil {
		t.Fatal(err)
	}
	close(proceed)
	start := time.Now()
	l, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(l.GetSessions()) != 2 {
		t.Fatalf("snapshot after the IpChange: %v", l)
	}
	t.Logf("next snapshot %v after the IpChange (interval 1h)", time.Since(start).Round(time.Millisecond))
	for _, s := range l.GetSessions() {
		if s.GetDstIp() == ip4(svcA4) {
			return true
		}
	}
	return false
}

// Without pins a stream ends with Unavailable; once the loader has run, a
// new stream gets a snapshot at once, not the failure of before.
func TestMonitorSessionsAfterTheLoaderRuns(t *testing.T) {
	e := newEnv(t, envOptions{noPins: true, refresh: 50 * time.Millisecond, interval: time.Hour})
	_, compat := e.controller()
	c := ctx(t)
	recv := func() error {
		s, err := compat.MonitorSessions(c, &session.Empty{})
		if err == nil {
			_, err = s.Recv()
		}
		return err
	}
	if err := recv(); code(err) != codes.Unavailable {
		t.Fatalf("without pins: %v, want Unavailable", err)
	}
	tu.PinMaps(t, e.pin, tu.PinOptions{})
	time.Sleep(200 * time.Millisecond) // a few refreshes
	if err := recv(); err != nil {
		t.Fatalf("after the loader ran: %v", err)
	}
}
