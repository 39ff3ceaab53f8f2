package store

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// splitRange partitions a range: the pieces are adjacent, in order, cover
// it exactly, and every key of it lies in exactly one, however deep the
// splitting goes and whatever characters the keys hold.
func TestSplitRangePartition(t *testing.T) {
	const dir = "/aegis/sessions/"
	top := keyRange{lo: dir, hi: dir[:len(dir)-1] + "0"}
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := splitChars + "-_~ \x00\x01\xff/A"
	var keys []string
	randomKey := func(prefix string) string {
		b := []byte(prefix)
		for range rng.IntN(6) {
			b = append(b, alphabet[rng.IntN(len(alphabet))])
		}
		return string(b)
	}
	var check func(r keyRange, depth int)
	check = func(r keyRange, depth int) {
		ps := splitRange(r)
		if ps == nil {
			return
		}
		if ps[0].lo != r.lo || ps[len(ps)-1].hi != r.hi {
			t.Fatalf("pieces of [%q, %q) span [%q, %q)", r.lo, r.hi, ps[0].lo, ps[len(ps)-1].hi)
		}
		for i, p := range ps {
			if p.lo >= p.hi {
				t.Fatalf("empty piece [%q, %q)", p.lo, p.hi)
			}
			if i > 0 && ps[i-1].hi != p.lo {
				t.Fatalf("pieces [%q, %q) and [%q, %q) not adjacent", ps[i-1].lo, ps[i-1].hi, p.lo, p.hi)
			}
		}
		// Keys at and around each bound, and random ones.
		var ks []string
		for _, p := range ps {
			ks = append(ks, p.lo, p.lo+"\x00", p.lo+"\xff", p.lo[:len(p.lo)-1], p.hi, p.hi[:len(p.hi)-1]+"\xff")
			ks = append(ks, randomKey(p.lo), randomKey(r.lo))
		}
		for i, k := range ks {
			// Every piece is looked at for some of the keys; for the others
			// the one that should hold it, found by its bound, and its
			// neighbours (the pieces are adjacent and in order).
			cand := ps
			if i%20 != 0 {
				j, _ := slices.BinarySearchFunc(ps, k, func(p keyRange, k string) int { return strings.Compare(p.hi, k+"\x00") })
				cand = ps[max(0, j-1):min(len(ps), j+2)]
			}
			in := 0
			for _, p := range cand {
				if p.lo <= k && k < p.hi {
					in++
				}
			}
			if want := btoi(r.lo <= k && k < r.hi); in != want {
				t.Fatalf("key %q of [%q, %q) in %d pieces, want %d", k, r.lo, r.hi, in, want)
			}
		}
		keys = append(keys, ks...)
		if depth < 2 {
			// Deeper, as a snapshot splits: a few pieces, and the last,
			// which ends where its parent did.
			for _, i := range []int{0, 1, len(ps) / 2, len(ps) - 1} {
				check(ps[i], depth+1)
			}
		}
	}
	check(top, 0)
	if len(keys) < 1000 || !slices.ContainsFunc(keys, func(k string) bool { return strings.HasPrefix(k, dir+"10") }) {
		t.Fatalf("checked %d keys", len(keys))
	}
	// A range no bound falls in is not split.
	if ps := splitRange(keyRange{lo: dir + "1", hi: dir + "1\x00"}); ps != nil {
		t.Errorf("[1, 1\\x00) split into %v", ps)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
