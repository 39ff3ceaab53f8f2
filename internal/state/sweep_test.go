package state_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// sweepMaps pins the data path's maps in a fresh directory, writes a config
// with the given default idle timeout, and opens them as the reaper does.
func sweepMaps(t testing.TB, defaultIdle time.Duration) (*state.Maps, string) {
	t.Helper()
	dir := tu.PinDir(t)
	pinMaps(t, dir)
	setDefaultIdle(t, dir, defaultIdle)
	m, err := state.Open(dir, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, dir
}

// setDefaultIdle rewrites the config map as the loader does.
func setDefaultIdle(t testing.TB, dir string, d time.Duration) {
	t.Helper()
	cfg, err := ebpf.LoadPinnedMap(state.MapPath(dir, state.MapConfig), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cfg.Close()
	c := state.Config{DefaultIdleTimeout: d}
	v, err := c.Value()
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
}

// key4 and key6 return distinct keys in the documentation ranges.
func key4(i int) state.Key {
	return state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}),
		Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 8)}), Port: uint16(1000 + i>>16), Proto: state.TCP}
}

func key6(i int) state.Key {
	return state.Key{Src: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 14: byte(i >> 8), 15: byte(i)}),
		Dst: netip.MustParseAddr("2001:db8:2::10"), Port: uint16(1000 + i>>16), Proto: state.UDP}
}

func mustGrant(t testing.TB, m *state.Maps, s state.Session) {
	t.Helper()
	if s.Created == 0 {
		s.Created = s.LastSeen
	}
	if err := m.Grant(s); err != nil {
		t.Fatal(err)
	}
}

func present(t testing.TB, m *state.Maps, k state.Key) bool {
	t.Helper()
	_, err := m.Lookup(k)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func TestSweepExpiry(t *testing.T) {
	m, dir := sweepMaps(t, 10*time.Second)
	now := state.Now()
	ago := func(d time.Duration) uint64 { return now - uint64(d) }
	cases := []struct {
		name    string
		s       state.Session
		reaped  bool
		cause   state.Expiry
		minIdle time.Duration
	}{
		{"own idle timeout passed", state.Session{LastSeen: ago(2 * time.Second), IdleTimeout: time.Second}, true, state.ExpiredIdle, 2 * time.Second},
		{"own idle timeout not passed", state.Session{LastSeen: ago(2 * time.Second), IdleTimeout: time.Hour}, false, 0, 0},
		{"default idle timeout passed", state.Session{LastSeen: ago(20 * time.Second)}, true, state.ExpiredIdle, 20 * time.Second},
		{"default idle timeout not passed", state.Session{LastSeen: ago(5 * time.Second)}, false, 0, 0},
		{"own timeout longer than the default", state.Session{LastSeen: ago(20 * time.Second), IdleTimeout: 30 * time.Second}, false, 0, 0},
		{"own timeout shorter than the default", state.Session{LastSeen: ago(8 * time.Second), IdleTimeout: 5 * time.Second}, true, state.ExpiredIdle, 8 * time.Second},
		{"lifetime passed, active", state.Session{LastSeen: now, IdleTimeout: time.Hour, Expires: ago(time.Millisecond)}, true, state.ExpiredLifetime, 0},
		{"lifetime passed and idle", state.Session{LastSeen: ago(time.Minute), IdleTimeout: time.Second, Expires: ago(time.Second)}, true, state.ExpiredLifetime, time.Minute},
		{"lifetime not passed", state.Session{LastSeen: now, IdleTimeout: time.Hour, Expires: now + uint64(time.Hour)}, false, 0, 0},
		{"stamped after the sweep's clock", state.Session{LastSeen: now + uint64(time.Second), IdleTimeout: time.Second}, false, 0, 0},
	}
	want := map[state.Key]int{}
	for i, c := range cases {
		for _, k := range []state.Key{key4(i), key6(i)} {
			s := c.s
			s.Key, s.User = k, fmt.Sprintf("user%d", i)
			mustGrant(t, m, s)
			want[k] = i
		}
	}

	seen := map[state.Key]bool{}
	res, err := state.NewSweeper().Sweep(context.Background(), m, func(r *state.Reaped) {
		i, ok := want[r.Key]
		switch {
		case !ok:
			t.Errorf("reaped unknown session %v", r.Key)
		case !cases[i].reaped:
			t.Errorf("%s: reaped %v, want it kept", cases[i].name, r.Key)
		case r.Cause != cases[i].cause:
			t.Errorf("%s: cause %v, want %v", cases[i].name, r.Cause, cases[i].cause)
		case r.User() != fmt.Sprintf("user%d", i) || r.Session().Key != r.Key:
			t.Errorf("%s: reaped user %q key %v", cases[i].name, r.User(), r.Session().Key)
		case r.Idle < cases[i].minIdle:
			t.Errorf("%s: idle %v, want at least %v", cases[i].name, r.Idle, cases[i].minIdle)
		}
		seen[r.Key] = true
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.DefaultIdleTimeout != 10*time.Second {
		t.Errorf("judged with default %v, want the config map's 10s", res.DefaultIdleTimeout)
	}
	var reaped, lifetime int
	for i, c := range cases {
		for _, k := range []state.Key{key4(i), key6(i)} {
			if got := present(t, m, k); got == c.reaped {
				t.Errorf("%s (%v): present=%v after the sweep", c.name, k, got)
			}
			if c.reaped && !seen[k] {
				t.Errorf("%s (%v): deleted without a report", c.name, k)
			}
		}
		if c.reaped {
			reaped++
			if c.cause == state.ExpiredLifetime {
				lifetime++
			}
		}
	}
	for _, f := range []state.FamilyResult{res.V4, res.V6} {
		if f.Scanned != len(cases) || f.Reaped() != reaped || f.Lifetime != lifetime || f.Regranted != 0 || f.Vanished != 0 {
			t.Errorf("family result %+v, want %d scanned, %d reaped (%d lifetime)", f, len(cases), reaped, lifetime)
		}
	}

	// The default is read again on every sweep: shortening it reaps the
	// sessions that rely on it and were within the old one.
	setDefaultIdle(t, dir, time.Second)
	res, err = state.NewSweeper().Sweep(context.Background(), m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.V4.Idle != 1 || res.V6.Idle != 1 || present(t, m, key4(3)) || present(t, m, key6(3)) {
		t.Errorf("after shortening the default to 1s: %+v, session 3 present %v", res, present(t, m, key4(3)))
	}
	// Sessions with their own timeout ignore the default.
	if !present(t, m, key4(4)) || !present(t, m, key6(4)) {
		t.Error("a session with its own 30s timeout was judged by the 1s default")
	}
}

// fillExpired grants n expired IPv4 sessions and n live ones.
func fillExpired(t *testing.T, m *state.Maps, n int) {
	t.Helper()
	now := state.Now()
	for i := 0; i < 2*n; i++ {
		s := state.Session{Key: key4(i), User: "u", LastSeen: now, IdleTimeout: time.Hour}
		if i%2 == 0 {
			s.LastSeen = now - uint64(2*time.Second)
			s.IdleTimeout = time.Second
		}
		mustGrant(t, m, s)
	}
}

func TestSweepStopsBetweenBatches(t *testing.T) {
	m, _ := sweepMaps(t, time.Minute)
	fillExpired(t, m, 10000)
	ctx, cancel := context.WithCancel(context.Background())
	sw := state.NewSweeper()
	batches := 0
	state.SetAfterScan(sw, func() {
		if batches++; batches == 1 {
			cancel()
		}
	})
	res, err := sw.Sweep(ctx, m, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("sweep: %v, want context.Canceled", err)
	}
	// The first section of the first batch is finished, nothing after it
	// is started.
	if batches != 1 || res.V4.Scanned == 0 || res.V4.Scanned >= 20000 || res.V6.Scanned != 0 {
		t.Fatalf("%d batches, %+v", batches, res)
	}
	v4, _, err := m.Count()
	if err != nil {
		t.Fatal(err)
	}
	if v4 != 20000-res.V4.Reaped() || res.V4.Reaped() == 0 || res.V4.Reaped() >= res.V4.Scanned/3 {
		t.Fatalf("%d sessions left after reaping %d of the first batch's %d, want one section's deletes", v4, res.V4.Reaped(), res.V4.Scanned)
	}
	// A sweep to the end reaps the rest, and only the expired ones.
	if res, err = sw.Sweep(context.Background(), m, nil); err != nil {
		t.Fatal(err)
	}
	if v4, _, _ = m.Count(); v4 != 10000 {
		t.Fatalf("%d sessions left, want the 10000 live ones (%+v)", v4, res)
	}
}

// A grant and a revoke that land between the scan of a batch and its
// deletes: the grant is kept, the revoke is not undone.
func TestSweepRacingGrantAndRevoke(t *testing.T) {
	m, _ := sweepMaps(t, time.Minute)
	now := state.Now()
	stale := func(k state.Key) state.Session {
		return state.Session{Key: k, User: "alice", LastSeen: now - uint64(time.Hour), IdleTimeout: time.Second}
	}
	for _, k := range []state.Key{key4(1), key4(2), key6(1), key6(2)} {
		mustGrant(t, m, stale(k))
	}
	sw := state.NewSweeper()
	batch := 0
	state.SetAfterScan(sw, func() {
		// One batch per map: sessions_v4's, then sessions_v6's.
		grant, revoke := key4(1), key4(2)
		if batch++; batch == 2 {
			grant, revoke = key6(1), key6(2)
		}
		mustGrant(t, m, state.Session{Key: grant, User: "bob", LastSeen: state.Now(), IdleTimeout: time.Hour})
		if err := m.Revoke(revoke); err != nil {
			t.Error(err)
		}
	})
	var reaped []state.Key
	res, err := sw.Sweep(context.Background(), m, func(r *state.Reaped) { reaped = append(reaped, r.Key) })
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []state.FamilyResult{res.V4, res.V6} {
		if f.Regranted != 1 || f.Vanished != 1 || f.Reaped() != 0 {
			t.Errorf("family result %+v, want 1 regranted, 1 vanished, 0 reaped", f)
		}
	}
	if len(reaped) != 0 {
		t.Errorf("reported %v as reaped", reaped)
	}
	for _, k := range []state.Key{key4(1), key6(1)} {
		s, err := m.Lookup(k)
		if err != nil || s.User != "bob" || s.IdleTimeout != time.Hour {
			t.Errorf("re-granted %v: %+v %v, want bob's grant", k, s, err)
		}
	}
	for _, k := range []state.Key{key4(2), key6(2)} {
		if present(t, m, k) {
			t.Errorf("revoked %v is back", k)
		}
	}
}

// Grants through the contract package while sweeps run back to back: every
// acknowledged grant of a live session is in the map whenever it is
// looked for. Granters expire a chunk of their sessions, so that sweeps
// find them, then grant them afresh, so that some grants land between a
// sweep's scan and its deletes.
func TestSweepConcurrentGrants(t *testing.T) {
	m, _ := sweepMaps(t, time.Minute)
	const granters, perGranter, chunk = 2, 2048, 256
	deadline := time.Now().Add(2 * time.Second)

	stop := make(chan struct{})
	var sweeps, reaped, regranted int
	var sweepErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		sw := state.NewSweeper()
		for {
			select {
			case <-stop:
				return
			default:
			}
			res, err := sw.Sweep(context.Background(), m, nil)
			if err != nil {
				sweepErr = err
				return
			}
			sweeps++
			reaped += res.Reaped()
			regranted += res.V4.Regranted + res.V6.Regranted
		}
	}()

	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	acked := 0
	for g := range granters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			keys := make([]state.Key, perGranter)
			for i := range keys {
				if i%2 == 0 {
					keys[i] = key4(g*perGranter + i)
				} else {
					keys[i] = key6(g*perGranter + i)
				}
			}
			last := make([]string, perGranter) // user of the last live grant
			fail := func(f string, args ...any) {
				mu.Lock()
				failures = append(failures, fmt.Sprintf(f, args...))
				mu.Unlock()
			}
			for round := 0; time.Now().Before(deadline); round++ {
				lo := (round * chunk) % perGranter
				for i := lo; i < lo+chunk; i++ {
					if last[i] != "" {
						// Nothing else writes this key: the previous live
						// grant must be there, at once.
						if s, err := m.Lookup(keys[i]); err != nil || s.User != last[i] {
							fail("%v: acknowledged grant %s lost during the run: found %q, %v", keys[i], last[i], s.User, err)
						}
					}
					if err := m.Grant(state.Session{Key: keys[i], User: "expired", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second}); err != nil {
						fail("grant: %v", err)
					}
				}
				for i := lo; i < lo+chunk; i++ {
					user := fmt.Sprintf("g%d-r%d", g, round)
					if err := m.Grant(state.Session{Key: keys[i], User: user, LastSeen: state.Now(), IdleTimeout: time.Hour}); err != nil {
						fail("grant: %v", err)
						continue
					}
					last[i] = user
					mu.Lock()
					acked++
					mu.Unlock()
				}
			}
			// After the last sweep, every last grant is in place.
			<-done
			for i, user := range last {
				if s, err := m.Lookup(keys[i]); user != "" && (err != nil || s.User != user) {
					fail("%v: acknowledged grant %s lost at the end: found %q, %v", keys[i], user, s.User, err)
				}
			}
		}()
	}
	go func() {
		for time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		close(stop)
	}()
	wg.Wait()
	if sweepErr != nil {
		t.Fatal(sweepErr)
	}
	for _, f := range failures[:min(len(failures), 10)] {
		t.Error(f)
	}
	overlaps, repaired := state.GuardStats(m)
	t.Logf("%d sweeps reaped %d expired sessions and kept %d re-granted ones; %d live grants acknowledged, %d lost; "+
		"%d writes overlapped a section, %d of them written again", sweeps, reaped, regranted, acked, len(failures), overlaps, repaired)
	if sweeps < 10 || reaped == 0 || overlaps == 0 {
		t.Fatalf("the sweeps did not race the grants: %d sweeps, %d reaped, %d overlaps", sweeps, reaped, overlaps)
	}
}

// smallMaps pins the maps with sessions maps of the given capacity.
func smallMaps(t *testing.T, capacity uint32) (*state.Maps, string) {
	t.Helper()
	spec, err := state.Spec()
	if err != nil {
		t.Fatal(err)
	}
	dir := tu.PinDir(t)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := state.EnsureSweepLock(dir, 0); err != nil {
		t.Fatal(err)
	}
	for _, name := range state.MapNames {
		ms := spec.Maps[name].Copy()
		if name == state.MapSessionsV4 || name == state.MapSessionsV6 {
			ms.MaxEntries = capacity
		}
		mp, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatal(err)
		}
		if err := mp.Pin(state.MapPath(dir, name)); err != nil {
			t.Fatal(err)
		}
		mp.Close()
	}
	setDefaultIdle(t, dir, time.Minute)
	m, err := state.Open(dir, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, dir
}

// A grant between a section's re-read of an expired session and its
// delete: the sweep deletes the grant's value with the key, the grant sees
// that the section overlapped it, waits for it to end and writes its value
// again before it returns.
func TestSweepRegrantInSection(t *testing.T) {
	m, _ := sweepMaps(t, time.Minute)
	k := key4(1)
	mustGrant(t, m, state.Session{Key: k, User: "alice", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second})
	sw := state.NewSweeper()
	granted := make(chan error, 1)
	state.SetBeforeDelete(sw, func() {
		// The grant blocks in its repair until the section ends: run it
		// aside and wait until its write is in the map.
		go func() {
			granted <- m.Grant(state.Session{Key: k, User: "bob", LastSeen: state.Now(), Created: state.Now(), IdleTimeout: time.Hour})
		}()
		for {
			if s, err := m.Lookup(k); err == nil && s.User == "bob" {
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
	})
	var reaped []string
	res, err := sw.Sweep(context.Background(), m, func(r *state.Reaped) { reaped = append(reaped, r.User()) })
	if err != nil {
		t.Fatal(err)
	}
	if err := <-granted; err != nil {
		t.Fatalf("grant: %v", err)
	}
	// The sweep deleted what it judged, alice's expired session, as far
	// as it knows; bob's grant is in place.
	if res.V4.Idle != 1 || len(reaped) != 1 || reaped[0] != "alice" {
		t.Errorf("sweep %+v reported %v, want alice's session reaped", res.V4, reaped)
	}
	if s, err := m.Lookup(k); err != nil || s.User != "bob" || s.IdleTimeout != time.Hour {
		t.Fatalf("after the sweep: %+v %v, want bob's grant", s, err)
	}
	if overlaps, repaired := state.GuardStats(m); overlaps != 1 || repaired != 1 {
		t.Fatalf("%d overlaps, %d repaired; want the grant to have written its value again", overlaps, repaired)
	}
}

// openSection does what a sweep does when it starts deleting, and returns
// a function that stops holding the lock without closing the section, as
// a sweep's death does.
func openSection(t *testing.T, m *state.Maps, dir string) (die func()) {
	t.Helper()
	l, err := state.LockDir(state.SweepLockPath(dir), true)
	if err != nil {
		t.Fatal(err)
	}
	var v bpf.AegisSweepSeqValue
	if err := m.SweepSeq.LookupWithFlags(uint32(0), &v, ebpf.LookupLock); err != nil {
		t.Fatal(err)
	}
	v.Seq = v.Seq | 1
	if err := m.SweepSeq.Update(uint32(0), &v, ebpf.UpdateLock); err != nil {
		t.Fatal(err)
	}
	return func() { l.Unlock() }
}

// A grant whose value an open section deleted, where the section's holder
// then died: the grant waits for the lock, finds its value gone and writes
// it again; on a map that other grants filled meanwhile it fails with
// ErrFull instead of returning success for a session that is not there.
func TestGrantRepairsAfterDeadSweep(t *testing.T) {
	for _, room := range []bool{true, false} {
		t.Run(fmt.Sprintf("room=%v", room), func(t *testing.T) {
			m, dir := smallMaps(t, 2)
			mustGrant(t, m, state.Session{Key: key4(1), User: "alice", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second})
			die := openSection(t, m, dir)
			granted := make(chan error, 1)
			go func() {
				granted <- m.Grant(state.Session{Key: key4(1), User: "bob", LastSeen: state.Now(), Created: state.Now(), IdleTimeout: time.Hour})
			}()
			for !present(t, m, key4(1)) || mustLookup(t, m, key4(1)).User != "bob" {
				time.Sleep(100 * time.Microsecond)
			}
			select {
			case err := <-granted:
				t.Fatalf("the grant returned (%v) while the section it overlapped was open", err)
			case <-time.After(20 * time.Millisecond):
			}
			// The section deletes the key (it read alice's expired value
			// before bob's grant), and the map fills up.
			k := bpf.AegisSessionKeyV4{Src: key4(1).Src.As4(), Dst: key4(1).Dst.As4(), Dport: key4(1).Port, Proto: uint8(key4(1).Proto)}
			if err := m.SessionsV4.Delete(&k); err != nil {
				t.Fatal(err)
			}
			fillers := 1
			if !room {
				fillers = 2
			}
			for i := range fillers {
				mustGrantRaw(t, m, key4(10+i))
			}
			die()
			err := <-granted
			if room {
				if err != nil || mustLookup(t, m, key4(1)).User != "bob" {
					t.Fatalf("grant: %v; want bob's session back in the map", err)
				}
				return
			}
			if !errors.Is(err, state.ErrFull) || present(t, m, key4(1)) {
				t.Fatalf("grant into a map filled meanwhile: %v, present %v; want ErrFull and no session", err, present(t, m, key4(1)))
			}
		})
	}
}

func mustLookup(t *testing.T, m *state.Maps, k state.Key) state.Session {
	t.Helper()
	s, err := m.Lookup(k)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// mustGrantRaw inserts a live session without the write protocol, as a
// writer would whose write the open section does not concern.
func mustGrantRaw(t *testing.T, m *state.Maps, k state.Key) {
	t.Helper()
	kk := bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(k.Proto)}
	v := bpf.AegisSessionValue{LastSeenNs: state.Now(), CreatedNs: state.Now(), IdleTimeoutNs: uint64(time.Hour)}
	if err := m.SessionsV4.Update(&kk, &v, ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
}

// stressPairs is the number of grant/revoke pairs of
// TestSweepStressGrantRevoke; AEGIS_STRESS_PAIRS overrides it.
func stressPairs(t *testing.T, def int) int {
	if v := os.Getenv("AEGIS_STRESS_PAIRS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("AEGIS_STRESS_PAIRS=%q: want a positive number", v)
		}
		return n
	}
	return def
}

// stressResult is what a stress run saw.
type stressResult struct {
	pairs, resurrected, lost  int
	sweeps, reaped, regranted int
	overlaps, repaired        uint64
	failures                  []string
}

// stressGrantRevoke runs grant/revoke pairs on sessions at the edge of
// expiry while two sweepers sweep continuously. Each worker owns its
// keys and, round after round, for each of them: checks that the key is
// absent (revoked in the previous round, granted by no one since), grants
// it expired, so that the sweeps find it expired; then grants it live
// (acknowledged); then checks that it is there, revokes it (which must
// find it) and checks that it is gone. A revoked key found present again
// is a resurrection; an acknowledged grant found absent, or a revoke that
// does not find it, is a lost grant.
//
// widen, if not nil, runs inside every sweep at the point of its design's
// window (see SetBeforeDelete, SetLegacySweep), to make it wide enough to
// hit in a bounded run.
func stressGrantRevoke(t *testing.T, pairs int, legacy bool, widen func()) stressResult {
	m, _ := sweepMaps(t, time.Minute)
	const workers, perWorker = 4, 128
	var res stressResult
	var mu sync.Mutex
	fail := func(kind *int, f string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		*kind++
		if len(res.failures) < 10 {
			res.failures = append(res.failures, fmt.Sprintf(f, args...))
		}
	}

	stop := make(chan struct{})
	var sweepers sync.WaitGroup
	var sweepErr error
	for range 2 {
		sweepers.Add(1)
		go func() {
			defer sweepers.Done()
			sw := state.NewSweeper()
			if legacy {
				state.SetLegacySweep(sw, widen)
			} else if widen != nil {
				state.SetBeforeDelete(sw, widen)
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				r, err := sw.Sweep(context.Background(), m, nil)
				mu.Lock()
				if err != nil && sweepErr == nil {
					sweepErr = err
				}
				res.sweeps++
				res.reaped += r.Reaped()
				res.regranted += r.V4.Regranted + r.V6.Regranted
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}

	rounds := (pairs + workers*perWorker - 1) / (workers * perWorker)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			keys := make([]state.Key, perWorker)
			for i := range keys {
				if i%2 == 0 {
					keys[i] = key4(w*perWorker + i)
				} else {
					keys[i] = key6(w*perWorker + i)
				}
			}
			absent := func(k state.Key, when string) {
				if _, err := m.Lookup(k); err == nil {
					fail(&res.resurrected, "%v: revoked, then present %s", k, when)
				} else if !errors.Is(err, state.ErrNotFound) {
					fail(&res.lost, "lookup %v: %v", k, err)
				}
			}
			for round := range rounds {
				for _, k := range keys {
					if round > 0 {
						absent(k, "at the start of the next round")
					}
					if err := m.Grant(state.Session{Key: k, User: "stale", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second}); err != nil {
						fail(&res.lost, "grant %v: %v", k, err)
					}
				}
				user := fmt.Sprintf("w%d-r%d", w, round)
				for _, k := range keys {
					if err := m.Grant(state.Session{Key: k, User: user, LastSeen: state.Now(), IdleTimeout: time.Hour}); err != nil {
						fail(&res.lost, "grant %v: %v", k, err)
					}
				}
				for _, k := range keys {
					if s, err := m.Lookup(k); err != nil || s.User != user {
						fail(&res.lost, "%v: acknowledged grant %s: found %q, %v", k, user, s.User, err)
					}
					if err := m.Revoke(k); err != nil {
						fail(&res.lost, "%v: revoke of acknowledged grant %s: %v", k, user, err)
					}
					absent(k, "right after the revoke")
				}
			}
			mu.Lock()
			res.pairs += rounds * len(keys)
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(stop)
	sweepers.Wait()
	if sweepErr != nil {
		t.Fatal(sweepErr)
	}
	// A put-back may land after the workers' last look.
	for w := range workers {
		for i := range perWorker {
			k := key4(w*perWorker + i)
			if i%2 == 1 {
				k = key6(w*perWorker + i)
			}
			if present(t, m, k) {
				fail(&res.resurrected, "%v: revoked, then present after the run", k)
			}
		}
	}
	res.overlaps, res.repaired = state.GuardStats(m)
	return res
}

func (r stressResult) String() string {
	return fmt.Sprintf("%d pairs, %d resurrected, %d lost; %d sweeps reaped %d and kept %d re-granted; "+
		"%d writes overlapped a section, %d written again", r.pairs, r.resurrected, r.lost, r.sweeps, r.reaped,
		r.regranted, r.overlaps, r.repaired)
}

// widenEvery sleeps 50µs on every nth call: a preempted sweeping thread.
func widenEvery(n int) func() {
	var calls atomic.Int64
	return func() {
		if calls.Add(1)%int64(n) == 0 {
			time.Sleep(50 * time.Microsecond)
		}
	}
}

// Grant/revoke pairs on sessions at the edge of expiry against continuous
// sweeps: nothing resurrected, nothing lost, both with the window between
// a section's re-read and its delete widened (grants land in it and must
// repair) and without.
func TestSweepStressGrantRevoke(t *testing.T) {
	pairs := stressPairs(t, 200_000)
	for _, c := range []struct {
		name  string
		widen func()
	}{{"plain", nil}, {"widened", widenEvery(4)}} {
		t.Run(c.name, func(t *testing.T) {
			n := pairs
			if c.widen != nil {
				n = pairs / 4
			}
			start := time.Now()
			r := stressGrantRevoke(t, n, false, c.widen)
			t.Logf("%v in %v", r, time.Since(start).Round(time.Millisecond))
			for _, f := range r.failures {
				t.Error(f)
			}
			if r.resurrected != 0 || r.lost != 0 {
				t.Fatalf("%d resurrected, %d lost", r.resurrected, r.lost)
			}
			if r.reaped == 0 || r.overlaps == 0 {
				t.Fatalf("the sweeps did not race the grants: %v", r)
			}
			if c.widen != nil && r.repaired == 0 {
				t.Fatalf("no grant landed in a section's window: %v", r)
			}
		})
	}
}

// The same stress against the earlier design, with its window (between
// LookupAndDelete and the put-back) widened as above: it resurrects
// revoked sessions and loses acknowledged grants, which is what the
// sections fix. Shows that the stress can fail.
func TestSweepStressFindsLegacyFlaws(t *testing.T) {
	r := stressGrantRevoke(t, stressPairs(t, 200_000)/4, true, widenEvery(1))
	t.Logf("earlier design: %v", r)
	if r.resurrected == 0 || r.lost == 0 {
		t.Fatalf("the stress found %d resurrected and %d lost with the earlier design; want both", r.resurrected, r.lost)
	}
}

// A revoke of a key whose grant is waiting to repair an overlapping
// section's delete runs after the repair, not before: otherwise it would
// find nothing and the repair would then bring the session back.
func TestRevokeWaitsForOverlappingGrant(t *testing.T) {
	m, dir := sweepMaps(t, time.Minute)
	k := key4(1)
	mustGrant(t, m, state.Session{Key: k, User: "alice", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second})
	die := openSection(t, m, dir)
	granted := make(chan error, 1)
	go func() {
		granted <- m.Grant(state.Session{Key: k, User: "bob", LastSeen: state.Now(), Created: state.Now(), IdleTimeout: time.Hour})
	}()
	for !present(t, m, k) || mustLookup(t, m, k).User != "bob" {
		time.Sleep(100 * time.Microsecond)
	}
	// The section deletes the key, as a sweep that re-read alice's value.
	kk := bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(k.Proto)}
	if err := m.SessionsV4.Delete(&kk); err != nil {
		t.Fatal(err)
	}
	revoked := make(chan error, 1)
	go func() { revoked <- m.Revoke(k) }()
	select {
	case err := <-revoked:
		t.Fatalf("the revoke returned (%v) while a grant of its key was unfinished", err)
	case <-time.After(20 * time.Millisecond):
	}
	die()
	if err := <-granted; err != nil {
		t.Fatal(err)
	}
	if err := <-revoked; err != nil {
		t.Fatalf("revoke after the grant's repair: %v, want it to find bob's session", err)
	}
	if present(t, m, k) {
		t.Fatal("the revoked session is back")
	}
}
