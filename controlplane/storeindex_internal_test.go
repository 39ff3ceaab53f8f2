package controlplane

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// The per-user links follow the index through every change the store loop
// makes to it (a restore's new index, a put, a put that passes a key to
// another user, a delete): userKeys lists exactly the keys a walk of the
// whole index finds for the user.
func TestUserKeysFollowIndex(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	users := []string{"alice", "bob", "carol", "dave"}
	key := func() state.Key {
		return state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(8))}), Dst: netip.MustParseAddr("198.51.100.10"),
			Port: uint16(1000 + rng.IntN(8)), Proto: state.TCP}
	}
	entry := func() *indexEntry {
		return &indexEntry{rec: store.Record{Key: key(), User: users[rng.IntN(len(users))], Created: rng.Int64()}}
	}
	l := &storeLoop{index: map[state.Key]*indexEntry{}, byUser: map[string]*indexEntry{}}
	check := func(step int) {
		t.Helper()
		for _, u := range users {
			var want []state.Key
			for k, e := range l.index {
				if e.rec.User == u {
					want = append(want, k)
				}
			}
			got := l.userKeys(u)
			less := func(a, b state.Key) int { return strings.Compare(a.String(), b.String()) }
			slices.SortFunc(want, less)
			slices.SortFunc(got, less)
			if !slices.Equal(got, want) {
				t.Fatalf("step %d: %s has %v, the index %v", step, u, got, want)
			}
		}
		if len(l.byUser) > len(users) {
			t.Fatalf("step %d: %d users linked", step, len(l.byUser))
		}
	}
	for step := range 5000 {
		switch n := rng.IntN(100); {
		case n < 2: // a restore
			idx := map[state.Key]*indexEntry{}
			for range rng.IntN(20) {
				e := entry()
				idx[e.rec.Key] = e
			}
			l.mu.Lock()
			l.setIndex(idx)
			l.mu.Unlock()
		case n < 60:
			l.mu.Lock()
			l.setEntry(entry())
			l.mu.Unlock()
		default:
			l.mu.Lock()
			l.dropEntry(key())
			l.mu.Unlock()
		}
		check(step)
	}
}
