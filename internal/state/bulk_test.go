package state_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// newMaps creates unpinned sessions maps of the given capacity (and the
// other maps) for tests of map operations.
func newMaps(t *testing.T, capacity uint32) *state.Maps {
	t.Helper()
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps[state.MapSessionsV4].MaxEntries = capacity
	spec.Maps[state.MapSessionsV6].MaxEntries = capacity
	var objs bpf.AegisMaps
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	return &state.Maps{SessionsV4: objs.SessionsV4, SessionsV6: objs.SessionsV6, AllowV4: objs.AllowV4,
		AllowV6: objs.AllowV6, Config: objs.Config, Stats: objs.Stats, SweepSeq: objs.SweepSeq}
}

var (
	cli4  = netip.MustParseAddr("192.0.2.10")
	svcA4 = netip.MustParseAddr("198.51.100.10")
	svcB4 = netip.MustParseAddr("198.51.100.20")
	svcC4 = netip.MustParseAddr("198.51.100.30")
	cli6  = netip.MustParseAddr("2001:db8:1::10")
	svcA6 = netip.MustParseAddr("2001:db8:2::10")
)

func sess(src, dst netip.Addr, port uint16, proto state.Protocol, user string) state.Session {
	now := state.Now()
	return state.Session{Key: state.Key{Src: src, Dst: dst, Port: port, Proto: proto}, User: user,
		LastSeen: now, Created: now, IdleTimeout: time.Minute}
}

func all(t *testing.T, m *state.Maps) map[state.Key]state.Session {
	t.Helper()
	out := make(map[state.Key]state.Session)
	for s, err := range m.Sessions() {
		if err != nil {
			t.Fatal(err)
		}
		out[s.Key] = s
	}
	return out
}

func TestUpsert(t *testing.T) {
	m := newMaps(t, 16)
	s := sess(cli4, svcA4, 443, state.TCP, "alice")
	s.Created, s.LastSeen = 100, 100
	got, created, err := m.Upsert(s)
	if err != nil || !created || got.Created != 100 || got.User != "alice" {
		t.Fatalf("first upsert: %+v created=%v err=%v", got, created, err)
	}
	s.Created, s.LastSeen, s.IdleTimeout, s.Expires = 200, 200, time.Hour, 999
	got, created, err = m.Upsert(s)
	if err != nil || created {
		t.Fatalf("refresh: created=%v err=%v", created, err)
	}
	if got.Created != 100 || got.LastSeen != 200 || got.User != "alice" || got.IdleTimeout != time.Hour || got.Expires != 999 {
		t.Fatalf("refresh returned created %d last seen %d user %q idle %v expires %d", got.Created, got.LastSeen, got.User, got.IdleTimeout, got.Expires)
	}
	if inMap, _ := m.Lookup(s.Key); inMap != got {
		t.Fatalf("map holds %+v, Upsert returned %+v", inMap, got)
	}
	// Another user's grant replaces the session: a new one for that user.
	s.Created, s.LastSeen, s.User = 300, 300, "bob"
	if got, created, err = m.Upsert(s); err != nil || created || got.Created != 300 || got.User != "bob" {
		t.Fatalf("grant to bob: created=%v err=%v, created %d user %q", created, err, got.Created, got.User)
	}
	v6 := sess(cli6, svcA6, 443, state.UDP, "carol")
	if _, created, err := m.Upsert(v6); err != nil || !created {
		t.Fatalf("IPv6 upsert: %v %v", created, err)
	}
	bad := s
	bad.Port = 0
	if _, _, err := m.Upsert(bad); !errors.Is(err, state.ErrInvalid) {
		t.Fatalf("invalid upsert: %v", err)
	}
}

func TestUpsertFullMap(t *testing.T) {
	m := newMaps(t, 2)
	a := sess(cli4, svcA4, 1, state.TCP, "a")
	b := sess(cli4, svcA4, 2, state.TCP, "b")
	for _, s := range []state.Session{a, b} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := m.Upsert(sess(cli4, svcA4, 3, state.TCP, "c")); !errors.Is(err, state.ErrFull) {
		t.Fatalf("grant into a full map: %v", err)
	}
	a.User = "again"
	if _, created, err := m.Upsert(a); err != nil || created {
		t.Fatalf("refresh in a full map: %v %v", created, err)
	}
	if got := all(t, m); len(got) != 2 || got[a.Key].User != "again" || got[b.Key].User != "b" {
		t.Fatalf("after: %v", got)
	}
}

func TestGrantAllIsAllOrNothing(t *testing.T) {
	m := newMaps(t, 3)
	existing := sess(cli4, svcA4, 80, state.UDP, "old")
	existing.IdleTimeout = 5 * time.Second
	filler := sess(cli4, svcB4, 1, state.TCP, "f")
	for _, s := range []state.Session{existing, filler} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	before := all(t, m)
	// TCP is new and fits (3rd slot); UDP refreshes the existing one; a
	// third new session does not fit: all three are undone.
	tcp := sess(cli4, svcA4, 80, state.TCP, "new")
	udp := sess(cli4, svcA4, 80, state.UDP, "new")
	extra := sess(cli4, svcC4, 80, state.TCP, "new")
	if _, err := m.GrantAll([]state.Session{tcp, udp, extra}); !errors.Is(err, state.ErrFull) {
		t.Fatalf("GrantAll into a full map: %v", err)
	}
	after := all(t, m)
	if len(after) != len(before) {
		t.Fatalf("sessions after a failed GrantAll: %v, want %v", after, before)
	}
	for k, s := range before {
		if after[k] != s {
			t.Fatalf("%v changed: %+v, was %+v", k, after[k], s)
		}
	}
	// Invalid: nothing written at all.
	bad := udp
	bad.User = ""
	if _, err := m.GrantAll([]state.Session{tcp, bad}); !errors.Is(err, state.ErrInvalid) {
		t.Fatalf("GrantAll with an invalid session: %v", err)
	}
	if _, err := m.Lookup(tcp.Key); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("the valid half of an invalid GrantAll was written: %v", err)
	}
	created, err := m.GrantAll([]state.Session{tcp, udp})
	if err != nil || !created[0] || created[1] {
		t.Fatalf("GrantAll: %v %v", created, err)
	}
}

func TestRevokeUser(t *testing.T) {
	m := newMaps(t, 16)
	for _, s := range []state.Session{
		sess(cli4, svcA4, 1, state.TCP, "alice"), sess(cli4, svcA4, 1, state.UDP, "alice"),
		sess(cli6, svcA6, 1, state.TCP, "alice"), sess(cli4, svcA4, 2, state.TCP, "bob"),
		sess(cli4, svcA4, 3, state.TCP, "alicex"),
	} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := m.RevokeUser("alice")
	if err != nil || len(keys) != 3 {
		t.Fatalf("revoked %v, %v; want 3", keys, err)
	}
	left := all(t, m)
	if len(left) != 2 {
		t.Fatalf("left: %v", left)
	}
	for _, s := range left {
		if s.User == "alice" {
			t.Fatalf("alice's session survived: %v", s)
		}
	}
	if keys, err := m.RevokeUser("nobody"); err != nil || len(keys) != 0 {
		t.Fatalf("revoke of a user without sessions: %v %v", keys, err)
	}
	if _, err := m.RevokeUser(""); !errors.Is(err, state.ErrInvalid) {
		t.Fatalf("empty user: %v", err)
	}
}

func TestMoveDestinations(t *testing.T) {
	m := newMaps(t, 16)
	toB := sess(cli4, svcA4, 443, state.TCP, "alice")
	toB.Created, toB.Expires = 42, state.Now()+uint64(time.Hour)
	toBUDP := sess(cli4, svcA4, 443, state.UDP, "alice")
	stay := sess(cli4, svcC4, 443, state.TCP, "carol")
	// A session at the new key that is not moving wins.
	conflict := sess(cli4, svcA4, 22, state.TCP, "moving")
	existing := sess(cli4, svcB4, 22, state.TCP, "existing")
	for _, s := range []state.Session{toB, toBUDP, stay, conflict, existing} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	res, err := m.MoveDestinations(map[netip.Addr]netip.Addr{svcA4: svcB4})
	if err != nil {
		t.Fatal(err)
	}
	if res.Moved != 2 || res.Superseded != 1 {
		t.Fatalf("result %+v, want 2 moved, 1 superseded", res)
	}
	got := all(t, m)
	if len(got) != 4 {
		t.Fatalf("sessions after the move: %v", got)
	}
	moved := toB
	moved.Dst = svcB4
	if s := got[moved.Key]; s.User != "alice" || s.Created != 42 || s.Expires != toB.Expires || s.IdleTimeout != toB.IdleTimeout {
		t.Fatalf("moved session %+v, want the original's user, times and timeouts", s)
	}
	if s := got[existing.Key]; s.User != "existing" {
		t.Fatalf("the existing session at the new key was replaced: %+v", s)
	}
	if _, ok := got[stay.Key]; !ok {
		t.Fatal("a session to another destination was touched")
	}

	// A swap swaps.
	res, err = m.MoveDestinations(map[netip.Addr]netip.Addr{svcB4: svcC4, svcC4: svcB4})
	if err != nil {
		t.Fatal(err)
	}
	got = all(t, m)
	if res.Moved != 4 || len(got) != 4 || got[state.Key{Src: cli4, Dst: svcB4, Port: 443, Proto: state.TCP}].User != "carol" ||
		got[state.Key{Src: cli4, Dst: svcC4, Port: 443, Proto: state.TCP}].User != "alice" {
		t.Fatalf("after the swap (%+v): %v", res, got)
	}

	for name, mv := range map[string]map[netip.Addr]netip.Addr{
		"zero":        {svcB4: netip.IPv4Unspecified()},
		"invalid":     {svcB4: {}},
		"mixed":       {svcB4: svcA6},
		"mapped":      {netip.MustParseAddr("::ffff:198.51.100.20"): svcA4},
		"unspecified": {netip.IPv6Unspecified(): svcA6},
	} {
		if _, err := m.MoveDestinations(mv); !errors.Is(err, state.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if after := all(t, m); len(after) != 4 {
		t.Fatalf("invalid moves changed the map: %v", after)
	}
}

// On a full map the move still happens: deletes make room.
func TestMoveDestinationsFullMap(t *testing.T) {
	m := newMaps(t, 2)
	a := sess(cli4, svcA4, 1, state.TCP, "a")
	b := sess(cli4, svcA4, 2, state.TCP, "b")
	for _, s := range []state.Session{a, b} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	res, err := m.MoveDestinations(map[netip.Addr]netip.Addr{svcA4: svcB4})
	if err != nil || res.Moved != 2 {
		t.Fatalf("move in a full map: %+v %v", res, err)
	}
	got := all(t, m)
	for _, s := range got {
		if s.Dst != svcB4 {
			t.Fatalf("after: %v", got)
		}
	}
	if len(got) != 2 {
		t.Fatalf("after: %v", got)
	}
}

func TestFill(t *testing.T) {
	m := newMaps(t, 8)
	now := state.Now()
	fresh := sess(cli4, svcA4, 1, state.TCP, "a")
	idle := sess(cli4, svcA4, 2, state.TCP, "a")
	idle.LastSeen = now - uint64(2*time.Minute)
	ended := sess(cli4, svcA4, 3, state.TCP, "a")
	ended.Expires = now - 1
	defaulted := sess(cli6, svcA6, 1, state.TCP, "a")
	defaulted.IdleTimeout = 0
	defaulted.LastSeen = now - uint64(20*time.Second)
	for _, s := range []state.Session{fresh, idle, ended, defaulted} {
		if _, _, err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	v4, v6, err := m.Fill(30*time.Second, now)
	if err != nil {
		t.Fatal(err)
	}
	if v4 != (state.Fill{Entries: 3, Active: 1, Capacity: 8}) || v6 != (state.Fill{Entries: 1, Active: 1, Capacity: 8}) {
		t.Fatalf("fill v4 %+v v6 %+v", v4, v6)
	}
	// With a 10 s default the IPv6 session, idle for 20 s, has expired.
	if _, v6, _ := m.Fill(10*time.Second, now); v6.Active != 0 {
		t.Fatalf("v6 with a 10 s default: %+v", v6)
	}
}

// A check refuses to replace a session: the map is unchanged, the check's
// error returned; it is not asked about a new key.
func TestUpsertChecked(t *testing.T) {
	m := newMaps(t, 16)
	refuse := errors.New("refused")
	var asked []state.Session
	check := func(old *state.Session) error {
		asked = append(asked, *old)
		if old.User == "alice" {
			return refuse
		}
		return nil
	}
	alice := sess(cli4, svcA4, 443, state.TCP, "alice")
	if _, created, err := m.UpsertChecked(alice, check); err != nil || !created || len(asked) != 0 {
		t.Fatalf("new key: created=%v err=%v, check asked about %v", created, err, asked)
	}
	before := all(t, m)
	bob := sess(cli4, svcA4, 443, state.TCP, "bob")
	if _, _, err := m.UpsertChecked(bob, check); !errors.Is(err, refuse) {
		t.Fatalf("refused replace: %v", err)
	}
	if len(asked) != 1 || asked[0].User != "alice" || asked[0].Key != alice.Key || asked[0].Created != alice.Created {
		t.Fatalf("check asked about %+v", asked)
	}
	if after := all(t, m); len(after) != 1 || after[alice.Key] != before[alice.Key] {
		t.Fatalf("map changed by a refused grant: %v", after)
	}
	// Both or neither: the second session's refusal undoes the first.
	udp := sess(cli4, svcA4, 443, state.UDP, "carol")
	if _, err := m.GrantAllChecked([]state.Session{udp, bob}, check); !errors.Is(err, refuse) {
		t.Fatalf("GrantAllChecked: %v", err)
	}
	if after := all(t, m); len(after) != 1 || after[alice.Key] != before[alice.Key] {
		t.Fatalf("map after a refused GrantAllChecked: %v", after)
	}
}
