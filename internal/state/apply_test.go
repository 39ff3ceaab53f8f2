package state_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/aegis-agent/aegis/internal/state"
)

// TestInsertNew writes more sessions than one batch holds into maps that
// hold another session and have room for all but the last few: every
// session that fits is written in full, the one held is left alone, the
// invalid one and those past the capacity are reported.
func TestInsertNew(t *testing.T) {
	const capacity = 10000
	m := newMaps(t, capacity)
	var ss []state.Session
	for i := range capacity + 3 {
		src := netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 250)})
		ss = append(ss, sess(src, svcA4, uint16(1000+i/250), state.TCP, "alice"))
	}
	held := ss[5]
	held.LastSeen += 1e9
	if err := m.Grant(held); err != nil {
		t.Fatal(err)
	}
	ss = append(ss[:5], ss[6:]...)
	ss = append(ss, sess(cli6, svcA6, 443, state.UDP, "bob"), sess(cli4, svcA4, 443, state.TCP, "not a user\n"))

	var failed []error
	written := m.InsertNew(ss, func(_ state.Session, err error) { failed = append(failed, err) })

	got := all(t, m)
	// The IPv4 map fills up (the held session and 9,999 written), plus
	// bob's IPv6 session.
	if written != capacity || len(got) != capacity+1 {
		t.Fatalf("wrote %d, maps hold %d; want %d and %d", written, len(got), capacity, capacity+1)
	}
	if s := got[held.Key]; s.LastSeen != held.LastSeen {
		t.Errorf("held session's last_seen %d, want it untouched at %d", s.LastSeen, held.LastSeen)
	}
	if _, ok := got[ss[len(ss)-2].Key]; !ok {
		t.Error("the IPv6 session is missing")
	}
	var full, invalid int
	for _, err := range failed {
		switch {
		case errors.Is(err, state.ErrFull):
			full++
		case errors.Is(err, state.ErrInvalid):
			invalid++
		default:
			t.Errorf("unexpected failure: %v", err)
		}
	}
	// 10,002 IPv4 sessions offered, room for 9,999: three do not fit.
	if full != 3 || invalid != 1 {
		t.Errorf("failures: %d full, %d invalid; want 3 and 1", full, invalid)
	}
	for _, s := range ss[:100] {
		if g := got[s.Key]; g.User != s.User || g.LastSeen != s.LastSeen || g.IdleTimeout != s.IdleTimeout {
			t.Fatalf("session %s reads back as %+v, want %+v", s.Key, g, s)
		}
	}
}
