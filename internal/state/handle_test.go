package state_test

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

func pinMaps(t testing.TB, dir string) { tu.PinMaps(t, dir, tu.PinOptions{}) }

func TestHandleFollowsThePins(t *testing.T) {
	dir := tu.PinDir(t)
	h := state.NewHandle(dir, state.OpenOptions{Writable: true}, zerolog.Nop())
	defer h.Close()
	s := state.Session{Key: state.Key{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.10"),
		Port: 443, Proto: state.TCP}, User: "alice", LastSeen: state.Now(), IdleTimeout: time.Minute}

	// Before the loader: ErrNotLoaded, and fn never runs.
	err := h.Do(func(*state.Maps) error { t.Fatal("fn ran without maps"); return nil })
	if !errors.Is(err, state.ErrNotLoaded) {
		t.Fatalf("before load: %v", err)
	}

	pinMaps(t, dir)
	if err := h.Do(func(m *state.Maps) error { return m.Grant(s) }); err != nil {
		t.Fatalf("after load: %v", err)
	}
	if err := h.Refresh(); err != nil {
		t.Fatalf("refresh with unchanged pins: %v", err)
	}
	if err := h.Do(func(m *state.Maps) error { _, err := m.Lookup(s.Key); return err }); err != nil {
		t.Fatalf("session lost on a no-op refresh: %v", err)
	}

	// Unload: the handle lets go of the old maps.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := h.Refresh(); !errors.Is(err, state.ErrNotLoaded) {
		t.Fatalf("refresh after unload: %v", err)
	}
	if err := h.Do(func(*state.Maps) error { return nil }); !errors.Is(err, state.ErrNotLoaded) {
		t.Fatalf("Do after unload: %v", err)
	}

	// A new load: new, empty maps are picked up.
	pinMaps(t, dir)
	if err := h.Refresh(); err != nil {
		t.Fatalf("refresh after reload: %v", err)
	}
	err = h.Do(func(m *state.Maps) error { _, err := m.Lookup(s.Key); return err })
	if !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("lookup in the new maps: %v, want ErrNotFound", err)
	}
}

// A load that replaces one map and keeps the others (a migration, a map
// created where it was missing) is followed too: the handle would
// otherwise keep reading a map nothing writes any more.
func TestHandleFollowsOneReplacedMap(t *testing.T) {
	dir := tu.PinDir(t)
	pinMaps(t, dir)
	h := state.NewHandle(dir, state.OpenOptions{}, zerolog.Nop())
	defer h.Close()
	if err := h.Refresh(); err != nil {
		t.Fatal(err)
	}
	before := h.MapID(state.MapAllowHits)
	sessions := h.MapID(state.MapSessionsV4)
	spec, err := state.Spec()
	if err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(spec.Maps[state.MapAllowHits])
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	path := state.MapPath(dir, state.MapAllowHits)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
	if err := h.Refresh(); err != nil {
		t.Fatal(err)
	}
	want, err := state.MapIDOf(m)
	if err != nil {
		t.Fatal(err)
	}
	if got := h.MapID(state.MapAllowHits); got != want || got == before || h.MapID(state.MapSessionsV4) != sessions {
		t.Fatalf("allow_hits %d (was %d, pinned %d), sessions_v4 %d (was %d)", got, before, want, h.MapID(state.MapSessionsV4), sessions)
	}
	err = h.Do(func(mm *state.Maps) error {
		id, err := state.MapIDOf(mm.AllowHits)
		if err == nil && id != want {
			t.Errorf("Do gives allow_hits %d, pinned %d", id, want)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}
