package state_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// sweepMaps pins the data path's maps in a fresh directory, writes a config
// with the given default idle timeout, and opens them as the reaper does.
func sweepMaps(t *testing.T, defaultIdle time.Duration) (*state.Maps, string) {
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
func setDefaultIdle(t *testing.T, dir string, d time.Duration) {
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
		if f.Scanned != len(cases) || f.Reaped() != reaped || f.Lifetime != lifetime || f.Restored != 0 || f.Vanished != 0 {
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
	// The first batch is finished, nothing after it is started.
	if batches != 1 || res.V4.Scanned == 0 || res.V4.Scanned >= 20000 || res.V6.Scanned != 0 {
		t.Fatalf("%d batches, %+v", batches, res)
	}
	v4, _, err := m.Count()
	if err != nil {
		t.Fatal(err)
	}
	if v4 != 20000-res.V4.Reaped() || res.V4.Reaped() < res.V4.Scanned/3 {
		t.Fatalf("%d sessions left after reaping %d of the first batch's %d", v4, res.V4.Reaped(), res.V4.Scanned)
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
		if f.Restored != 1 || f.Vanished != 1 || f.Reaped() != 0 {
			t.Errorf("family result %+v, want 1 restored, 1 vanished, 0 reaped", f)
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
// acknowledged grant of a live session survives. Granters expire a chunk of
// their sessions, so that sweeps find them, then grant them afresh, so that
// some grants land between a sweep's scan and its delete.
func TestSweepConcurrentGrants(t *testing.T) {
	m, _ := sweepMaps(t, time.Minute)
	const granters, perGranter, chunk = 2, 2048, 256
	deadline := time.Now().Add(2 * time.Second)

	stop := make(chan struct{})
	var sweeps, reaped, restored int
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
			restored += res.V4.Restored + res.V6.Restored
		}
	}()

	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	acked := 0
	absent, longest := 0, time.Duration(0) // grants seen absent while being put back
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
						// The previous live grant must still be there. A
						// session being put back is absent between the
						// sweep's delete and its put-back: microseconds,
						// more when the sweeping thread is preempted on a
						// busy machine. Nothing else writes this key
						// meanwhile, so a lost grant stays absent: wait
						// for it up to a second before calling it lost.
						s, err := m.Lookup(keys[i])
						if errors.Is(err, state.ErrNotFound) {
							wait := time.Now()
							for errors.Is(err, state.ErrNotFound) && time.Since(wait) < time.Second {
								time.Sleep(100 * time.Microsecond)
								s, err = m.Lookup(keys[i])
							}
							mu.Lock()
							absent, longest = absent+1, max(longest, time.Since(wait))
							mu.Unlock()
						}
						if err != nil || s.User != last[i] {
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
	t.Logf("%d sweeps reaped %d expired sessions and put back %d re-granted ones; %d live grants acknowledged, %d lost; "+
		"%d seen absent while being put back, for up to %v", sweeps, reaped, restored, acked, len(failures), absent, longest)
	if sweeps < 10 || reaped == 0 || restored == 0 {
		t.Fatalf("the sweeps did not race the grants: %d sweeps, %d reaped, %d put back", sweeps, reaped, restored)
	}
}

// smallMaps pins the maps with sessions maps of the given capacity.
func smallMaps(t *testing.T, capacity uint32) *state.Maps {
	t.Helper()
	spec, err := state.Spec()
	if err != nil {
		t.Fatal(err)
	}
	dir := tu.PinDir(t)
	if err := os.MkdirAll(dir, 0o750); err != nil {
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
	return m
}

// A session re-granted while the sweep deletes it, on a full map: a grant
// of another key takes the slot the delete freed. If another delete of the
// batch makes room, before (an immediate put back) or after (a retry at
// the end of the batch), depending on the order of the hash buckets, the
// session is put back; if none does, the sweep says which session of which
// user it could not put back.
func TestSweepRegrantOnFullMap(t *testing.T) {
	now := state.Now()
	expired := func(i int) state.Session {
		return state.Session{Key: key4(i), User: fmt.Sprintf("u%d", i), LastSeen: now - uint64(time.Hour), IdleTimeout: time.Second}
	}
	live := func(i int) state.Session {
		return state.Session{Key: key4(i), User: fmt.Sprintf("u%d", i), LastSeen: state.Now(), IdleTimeout: time.Hour}
	}
	for _, room := range []bool{true, false} {
		t.Run(fmt.Sprintf("room=%v", room), func(t *testing.T) {
			// Full: session 1 (expired, re-granted during the sweep), 2
			// (live) and, with room, 3 (expired: its delete makes room).
			m := smallMaps(t, 3)
			mustGrant(t, m, expired(1))
			mustGrant(t, m, live(2))
			if room {
				mustGrant(t, m, expired(3))
			} else {
				mustGrant(t, m, live(3))
			}
			sw := state.NewSweeper()
			first := true
			state.SetAfterScan(sw, func() { // sessions_v4's batch only
				if first {
					mustGrant(t, m, live(1))
				}
				first = false
			})
			state.SetBeforePutBack(sw, func() { mustGrant(t, m, live(4)) })
			res, err := sw.Sweep(context.Background(), m, nil)
			if res.V4.Restored != 1 {
				t.Fatalf("%+v, want one session put back", res.V4)
			}
			if room {
				if err != nil || !present(t, m, key4(1)) || !present(t, m, key4(4)) || present(t, m, key4(3)) {
					t.Fatalf("sweep: %v; sessions 1, 4 present: %v %v; 3 present: %v", err,
						present(t, m, key4(1)), present(t, m, key4(4)), present(t, m, key4(3)))
				}
				return
			}
			if !errors.Is(err, state.ErrSessionLost) || !strings.Contains(err.Error(), key4(1).String()) ||
				!strings.Contains(err.Error(), `"u1"`) {
				t.Fatalf("sweep: %v, want ErrSessionLost naming session 1 and its user", err)
			}
		})
	}
}
