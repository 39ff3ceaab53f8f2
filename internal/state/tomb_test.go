package state_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// tombMaps pins the maps with tombstone maps of the given capacity (0:
// the build's) and opens them as the daemons do.
func tombMaps(t *testing.T, tombs uint32) (*state.Maps, string) {
	t.Helper()
	dir := tu.PinDir(t)
	tu.PinMaps(t, dir, tu.PinOptions{TombCapacity: tombs})
	m, err := state.Open(dir, state.OpenOptions{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, dir
}

func mustTomb(t *testing.T, m *state.Maps, k state.Key) state.Tomb {
	t.Helper()
	tb, err := m.LookupTomb(k)
	if err != nil {
		t.Fatalf("tombstone of %s: %v", k, err)
	}
	return tb
}

func noTomb(t *testing.T, m *state.Maps, k state.Key) {
	t.Helper()
	if tb, err := m.LookupTomb(k); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("tombstone of %s: %+v %v, want none", k, tb, err)
	}
}

func anyKey(k state.Key) state.Key { k.Proto = state.Any; return k }

// A revoke buries the session: its tombstone is written, fresh, for every
// family and protocol, and the session is gone. A revoke of nothing
// buries nothing.
func TestRevokeLeavesTombstone(t *testing.T) {
	m, _ := tombMaps(t, 0)
	keys := []state.Key{key4(1), key6(1), anyKey(key4(2)), anyKey(key6(2))}
	for _, k := range keys {
		mustGrant(t, m, state.Session{Key: k, User: "alice", LastSeen: state.Now(), IdleTimeout: time.Hour})
	}
	before := state.Now()
	for _, k := range keys {
		if err := m.Revoke(k); err != nil {
			t.Fatalf("revoke %s: %v", k, err)
		}
	}
	after := state.Now()
	for _, k := range keys {
		if present(t, m, k) {
			t.Errorf("%s still has a session", k)
		}
		tb := mustTomb(t, m, k)
		if tb.Cause != state.TombRevoked || tb.Removed < before || tb.Removed > after || tb.LastSeen != tb.Removed {
			t.Errorf("%s: tombstone %+v, want revoked within [%d, %d]", k, tb, before, after)
		}
	}
	if err := m.Revoke(key4(9)); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("revoke of nothing: %v, want ErrNotFound", err)
	}
	noTomb(t, m, key4(9))
	v4, v6, err := m.TombFill(state.Config{FlowIdleUDP: time.Minute}, state.Now())
	if err != nil || v4.Entries != 2 || v6.Entries != 2 || v4.Active != 2 || v6.Active != 2 {
		t.Fatalf("fill %+v %+v %v, want 2 live tombstones a family", v4, v6, err)
	}
	// A grant of the key passes again; the tombstone under it is moot
	// (the egress program asks for the session first) and is replaced by
	// the next removal.
	mustGrant(t, m, state.Session{Key: keys[0], User: "alice", LastSeen: state.Now(), IdleTimeout: time.Hour})
	if !present(t, m, keys[0]) {
		t.Fatal("the grant after the revoke is not in the map")
	}
}

// The sweep buries each expired session before deleting it, with the
// cause, and deletes the tombstones idle past the UDP flow idle timeout
// (two minutes here, the default), keeping the fresh ones.
func TestSweepBuriesAndDeletesTombstones(t *testing.T) {
	m, _ := tombMaps(t, 0)
	now := state.Now()
	mustGrant(t, m, state.Session{Key: key4(1), User: "a", LastSeen: now - uint64(time.Hour), IdleTimeout: time.Second})
	mustGrant(t, m, state.Session{Key: key6(1), User: "a", LastSeen: now - uint64(time.Hour), IdleTimeout: time.Second})
	mustGrant(t, m, state.Session{Key: key4(2), User: "b", LastSeen: now, IdleTimeout: time.Hour})
	old := bpf.AegisTombValue{LastSeenNs: now - uint64(3*time.Minute), RemovedNs: now - uint64(time.Hour), Cause: uint32(state.TombRevoked)}
	fresh := old
	fresh.LastSeenNs = now - uint64(time.Minute)
	for k, v := range map[state.Key]bpf.AegisTombValue{key4(3): old, key6(3): old, key4(4): fresh, key6(4): fresh} {
		if err := state.PutTomb(m, k, v); err != nil {
			t.Fatal(err)
		}
	}
	res, err := state.NewSweeper().Sweep(context.Background(), m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Reaped() != 2 || res.TombsV4 != (state.TombResult{Scanned: 2, Deleted: 1}) || res.TombsV6 != (state.TombResult{Scanned: 2, Deleted: 1}) {
		t.Fatalf("sweep %+v: want 2 sessions reaped and one stale tombstone of two deleted a family", res)
	}
	for _, k := range []state.Key{key4(1), key6(1)} {
		if present(t, m, k) {
			t.Errorf("%s: expired session kept", k)
		}
		if tb := mustTomb(t, m, k); tb.Cause != state.TombExpired || tb.LastSeen < now {
			t.Errorf("%s: tombstone %+v, want a fresh expired one", k, tb)
		}
	}
	noTomb(t, m, key4(2))
	noTomb(t, m, key4(3))
	noTomb(t, m, key6(3))
	mustTomb(t, m, key4(4))
	mustTomb(t, m, key6(4))
}

// A full tombstone map fails closed. A revoke keeps the session, dead
// (the data path's rule finds it expired), as its own tombstone, and
// counts it; the sweep leaves a dead session where it is while there is
// no room, and buries it (as revoked) once a stale tombstone made room.
func TestTombstonesFullFailsClosed(t *testing.T) {
	m, _ := tombMaps(t, 1)
	now := state.Now()
	for _, k := range []state.Key{key4(1), key4(2)} {
		mustGrant(t, m, state.Session{Key: k, User: "alice", LastSeen: now, IdleTimeout: time.Hour})
	}
	mustGrant(t, m, state.Session{Key: key4(3), User: "bob", LastSeen: now - uint64(time.Hour), IdleTimeout: time.Second})
	if err := m.Revoke(key4(1)); err != nil {
		t.Fatal(err)
	}
	mustTomb(t, m, key4(1))
	if err := m.Revoke(key4(2)); err != nil {
		t.Fatalf("revoke with the tombstone map full: %v", err)
	}
	s := mustLookup(t, m, key4(2))
	if s.Expires != state.RevokedMark || s.Verdict(time.Minute, state.Now()) != bpf.ReasonExpired {
		t.Fatalf("the session revoked without room is %+v, want kept dead", s)
	}
	if n := m.RevokesKeptDead(); n != 1 {
		t.Fatalf("%d revokes kept dead, want 1", n)
	}
	noTomb(t, m, key4(2))

	sw := state.NewSweeper()
	res, err := sw.Sweep(context.Background(), m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.V4.Kept != 2 || res.V4.Reaped() != 0 || !present(t, m, key4(2)) || !present(t, m, key4(3)) {
		t.Fatalf("sweep without room: %+v, want both dead sessions kept", res.V4)
	}

	// Age key4(1)'s tombstone past the UDP flow idle timeout: the next
	// sweep deletes it and buries one of the two in its place.
	tb := mustTomb(t, m, key4(1))
	if err := state.PutTomb(m, key4(1), bpf.AegisTombValue{LastSeenNs: tb.LastSeen - uint64(time.Hour), RemovedNs: tb.Removed, Cause: uint32(tb.Cause)}); err != nil {
		t.Fatal(err)
	}
	if res, err = sw.Sweep(context.Background(), m, nil); err != nil {
		t.Fatal(err)
	}
	if res.TombsV4.Deleted != 1 || res.V4.Reaped() != 1 || res.V4.Kept != 1 {
		t.Fatalf("sweep with room for one: %+v", res)
	}
	buried := key4(2)
	if present(t, m, buried) {
		buried = key4(3)
	}
	want := map[state.Key]state.TombCause{key4(2): state.TombRevoked, key4(3): state.TombExpired}[buried]
	if tb := mustTomb(t, m, buried); tb.Cause != want {
		t.Fatalf("%s buried as %v, want %v", buried, tb.Cause, want)
	}
}

// A revoke's tombstone written between a tombstone section's re-read of
// a stale tombstone of the same key and its delete: the section deletes
// the fresh tombstone, the revoke sees that the section overlapped it and
// writes it again before deleting the session. Without that check
// (SetUnguardedTombs) the tombstone is lost while the session is gone: the
// user's reply tuple would be open to the service's next packet.
func TestRevokeTombRaceWithTombSweep(t *testing.T) {
	for _, guarded := range []bool{true, false} {
		name := "guarded"
		if !guarded {
			name = "unguarded"
		}
		t.Run(name, func(t *testing.T) {
			m, _ := tombMaps(t, 0)
			if !guarded {
				state.SetUnguardedTombs(m)
			}
			k := key4(1)
			now := state.Now()
			stale := bpf.AegisTombValue{LastSeenNs: now - uint64(time.Hour), RemovedNs: now - uint64(time.Hour), Cause: uint32(state.TombExpired)}
			if err := state.PutTomb(m, k, stale); err != nil {
				t.Fatal(err)
			}
			mustGrant(t, m, state.Session{Key: k, User: "alice", LastSeen: now, IdleTimeout: time.Hour})
			sw := state.NewSweeper()
			revoked := make(chan error, 1)
			state.SetBeforeTombDelete(sw, func() {
				go func() { revoked <- m.Revoke(k) }()
				// Until the revoke's tombstone is in the map (guarded, it
				// then waits for the section; unguarded, it goes on).
				for {
					if tb, err := m.LookupTomb(k); err == nil && tb.Cause == state.TombRevoked {
						return
					}
					time.Sleep(100 * time.Microsecond)
				}
			})
			res, err := sw.Sweep(context.Background(), m, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := <-revoked; err != nil {
				t.Fatalf("revoke: %v", err)
			}
			if res.TombsV4.Deleted != 1 {
				t.Fatalf("sweep %+v: the section did not delete the tombstone it judged stale", res.TombsV4)
			}
			if present(t, m, k) {
				t.Fatal("the session survived its revoke")
			}
			_, err = m.LookupTomb(k)
			if guarded && err != nil {
				t.Fatalf("guarded: the revoke's tombstone is gone (%v): the session is deleted with nothing in its place", err)
			}
			if !guarded && !errors.Is(err, state.ErrNotFound) {
				t.Fatalf("unguarded: the tombstone survived (%v): the test no longer puts the write inside the section", err)
			}
		})
	}
}
