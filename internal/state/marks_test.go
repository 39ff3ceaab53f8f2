package state_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Every way this package writes a session marks the session's port (and
// protocol) first: a grant, a grant of several, a restore's batch insert,
// a destination move. Marks of other ports and protocols stay unset.
func TestSessionWritesMarkTheirPort(t *testing.T) {
	m, _ := tombMaps(t, 0)
	slot := func(proto state.Protocol, port uint16) uint32 {
		base := map[state.Protocol]bpf.AegisMarkSlot{state.TCP: bpf.AegisMarkSlotMARK_TCP,
			state.UDP: bpf.AegisMarkSlotMARK_UDP, state.Any: bpf.AegisMarkSlotMARK_ANY}[proto]
		return uint32(base) + uint32(port)
	}
	marked := func(proto state.Protocol, port uint16) bool {
		t.Helper()
		var v uint32
		if err := m.PortMarks.Lookup(slot(proto, port), &v); err != nil {
			t.Fatal(err)
		}
		return v != 0
	}
	now := state.Now()
	session := func(dst netip.Addr, port uint16, proto state.Protocol) state.Session {
		return state.Session{Key: state.Key{Src: cli4, Dst: dst, Port: port, Proto: proto}, User: "alice",
			LastSeen: now, Created: now, IdleTimeout: time.Hour}
	}

	mustGrant(t, m, session(svcA4, 1001, state.TCP))
	if _, err := m.GrantAll([]state.Session{session(svcA4, 1002, state.UDP), session(svcA4, 1003, state.Any)}); err != nil {
		t.Fatal(err)
	}
	failed := 0
	if n := m.InsertNew([]state.Session{session(svcB4, 1004, state.TCP), {Key: state.Key{Src: cli6, Dst: svcA6, Port: 1005, Proto: state.UDP},
		User: "bob", LastSeen: now, IdleTimeout: time.Hour}}, func(state.Session, error) { failed++ }); n != 2 || failed != 0 {
		t.Fatalf("InsertNew wrote %d, %d failed", n, failed)
	}
	for _, w := range []struct {
		proto state.Protocol
		port  uint16
	}{{state.TCP, 1001}, {state.UDP, 1002}, {state.Any, 1003}, {state.TCP, 1004}, {state.UDP, 1005}} {
		if !marked(w.proto, w.port) {
			t.Errorf("%v/%d written, not marked", w.proto, w.port)
		}
	}
	for _, w := range []struct {
		proto state.Protocol
		port  uint16
	}{{state.UDP, 1001}, {state.Any, 1001}, {state.TCP, 1002}, {state.TCP, 1003}, {state.TCP, 1006}} {
		if marked(w.proto, w.port) {
			t.Errorf("%v/%d marked, no such session", w.proto, w.port)
		}
	}

	// A move writes the moved sessions anew: into a fresh marks map, as
	// after an unload and load, the move marks them again.
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	fresh, err := ebpf.NewMap(spec.Maps[state.MapPortMarks])
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	m.Set(state.MapPortMarks, fresh) // also forgets which slots it had set
	if _, err := m.MoveDestinations(map[netip.Addr]netip.Addr{svcB4: svcC4}); err != nil {
		t.Fatal(err)
	}
	if !marked(state.TCP, 1004) || marked(state.TCP, 1001) {
		t.Errorf("after the move into a fresh map: 1004 marked %v (want true), 1001 marked %v (want false)",
			marked(state.TCP, 1004), marked(state.TCP, 1001))
	}
}
