package controlplane

import (
	"bytes"
	"cmp"
	"container/heap"
	"encoding/base64"
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// This file pages ListSessions. The maps are hash tables without an order,
// so each page is one walk of both maps that keeps, in a heap bounded by
// the page size, the smallest keys after the page token's key: the work of
// a page is one walk (O(n log page size)), its memory one page, and no
// state is kept between pages. A token is the last key of its page; a
// session that exists throughout a walk of the pages is after exactly one
// page's token and within that page's bound, so it is listed exactly once,
// whatever is inserted or deleted meanwhile (a batch walk of a hash map
// sees every entry present throughout it once: buckets are never rehashed).

// Page sizes of ListSessions.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
)

// listKey orders sessions: IPv4 before IPv6, then source, destination,
// port, protocol.
type listKey struct {
	v6       bool
	src, dst [16]byte // an IPv4 address in the first 4 bytes
	port     uint16
	proto    uint8
}

func compareListKeys(a, b *listKey) int {
	if a.v6 != b.v6 {
		if !a.v6 {
			return -1
		}
		return 1
	}
	return cmp.Or(bytes.Compare(a.src[:], b.src[:]), bytes.Compare(a.dst[:], b.dst[:]),
		cmp.Compare(a.port, b.port), cmp.Compare(a.proto, b.proto))
}

const pageTokenVersion = 1

// token encodes k as a page token: a version, the family, the key.
func (k *listKey) token() string {
	n := 4
	fam := byte(4)
	if k.v6 {
		n, fam = 16, 6
	}
	b := make([]byte, 0, 2+2*n+3)
	b = append(b, pageTokenVersion, fam)
	b = append(b, k.src[:n]...)
	b = append(b, k.dst[:n]...)
	b = binary.BigEndian.AppendUint16(b, k.port)
	b = append(b, k.proto)
	return base64.RawURLEncoding.EncodeToString(b)
}

func parsePageToken(s string) (listKey, error) {
	var k listKey
	bad := invalidf("page_token %q: not a next_page_token of ListSessions", clip(s))
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) < 2 || b[0] != pageTokenVersion {
		return k, bad
	}
	n := 0
	switch b[1] {
	case 4:
		n = 4
	case 6:
		n, k.v6 = 16, true
	default:
		return k, bad
	}
	if len(b) != 2+2*n+3 {
		return k, bad
	}
	copy(k.src[:], b[2:2+n])
	copy(k.dst[:], b[2+n:2+2*n])
	k.port = binary.BigEndian.Uint16(b[2+2*n:])
	k.proto = b[2+2*n+2]
	return k, nil
}

// listFilter is what ListSessions matches: zero fields match everything.
type listFilter struct {
	user     string
	src, dst netip.Addr
	port     uint16
}

func (f *listFilter) match(k *listKey, v *bpf.AegisSessionValue) bool {
	addr := func(want netip.Addr, got *[16]byte) bool {
		if !want.IsValid() {
			return true
		}
		if want.Is4() != !k.v6 {
			return false
		}
		if want.Is4() {
			a := want.As4()
			return [4]byte(got[:4]) == a
		}
		return want.As16() == *got
	}
	return (f.port == 0 || k.port == f.port) && addr(f.src, &k.src) && addr(f.dst, &k.dst) &&
		(f.user == "" || state.UserIs(v, f.user))
}

type pageEntry struct {
	k listKey
	v bpf.AegisSessionValue
}

// pageHeap is a max-heap on the key: the page's largest key is at the top,
// to be replaced by a smaller one.
type pageHeap []pageEntry

func (h pageHeap) Len() int           { return len(h) }
func (h pageHeap) Less(i, j int) bool { return compareListKeys(&h[i].k, &h[j].k) > 0 }
func (h pageHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *pageHeap) Push(x any)        { *h = append(*h, x.(pageEntry)) }
func (h *pageHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// page is one page of sessions, in key order.
type page struct {
	sessions []state.Session
	matched  uint64
	next     string // token of the next page; empty if this is the last
}

// listPage walks both maps once and returns the first size sessions
// matching f whose key is after after (nil: from the start).
func listPage(m *state.Maps, f *listFilter, after *listKey, size int) (page, error) {
	var p page
	h := make(pageHeap, 0, size+1)
	consider := func(e *pageEntry) {
		if !f.match(&e.k, &e.v) {
			return
		}
		p.matched++
		if after != nil && compareListKeys(&e.k, after) <= 0 {
			return
		}
		// One more than the page, to know whether another page follows.
		if len(h) <= size {
			heap.Push(&h, *e)
		} else if compareListKeys(&e.k, &h[0].k) < 0 {
			h[0] = *e
			heap.Fix(&h, 0)
		}
	}
	var e pageEntry
	err := m.EachV4(func(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) bool {
		e.k = listKey{port: k.Dport, proto: k.Proto}
		copy(e.k.src[:], k.Src[:])
		copy(e.k.dst[:], k.Dst[:])
		e.v = *v
		consider(&e)
		return true
	})
	if err != nil {
		return p, err
	}
	err = m.EachV6(func(k *bpf.AegisSessionKeyV6, v *bpf.AegisSessionValue) bool {
		e.k = listKey{v6: true, src: k.Src, dst: k.Dst, port: k.Dport, proto: k.Proto}
		e.v = *v
		consider(&e)
		return true
	})
	if err != nil {
		return p, err
	}
	entries := []pageEntry(h)
	slices.SortFunc(entries, func(a, b pageEntry) int { return compareListKeys(&a.k, &b.k) })
	if len(entries) > size {
		entries = entries[:size]
		p.next = entries[size-1].k.token()
	}
	p.sessions = make([]state.Session, len(entries))
	for i := range entries {
		k := &entries[i].k
		if k.v6 {
			p.sessions[i] = state.SessionOf6(&bpf.AegisSessionKeyV6{Src: k.src, Dst: k.dst, Dport: k.port, Proto: k.proto}, &entries[i].v)
		} else {
			p.sessions[i] = state.SessionOf4(&bpf.AegisSessionKeyV4{Src: [4]byte(k.src[:4]), Dst: [4]byte(k.dst[:4]), Dport: k.port, Proto: k.proto}, &entries[i].v)
		}
	}
	return p, nil
}

// pageSize is the size of a page asked for: page_size, else the older
// limit, else the default; at most MaxPageSize.
func pageSize(pageSize, limit uint32) int {
	n := pageSize
	if n == 0 {
		n = limit
	}
	if n == 0 {
		return DefaultPageSize
	}
	return min(int(n), MaxPageSize)
}
