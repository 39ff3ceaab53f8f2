package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// A snapshot of the sessions is read as several disjoint ranges of keys,
// in parallel, all at the one revision of the first request. etcd 3.4
// walks its index over the whole rest of a range even for a request with
// a limit, so one large range read in pages costs pages × keys; ranges
// that each fit one request cost each key once, and several in flight
// keep every member (the client spreads requests over the endpoints) and
// both sides' cores busy.
//
// The ranges come from counting. The first request only takes the
// revision (a linearizable read of one key); everything after reads at
// it. Counting requests (read-only transactions of count-only ranges,
// which read etcd's index and no value) split sessions/ at every
// splitWidth characters of splitChars that follow it; a range holding
// more than a piece's worth is split the same way deeper, until it
// fits or cannot be split, while the ranges already small enough are
// read. A revision compacted meanwhile fails the snapshot with
// ErrCompacted, and Snapshot reads again at a newer one.

// DefaultSnapshotReads is how many requests of a snapshot are in flight
// at once by default.
const DefaultSnapshotReads = 4

// snapshotReads is how many requests of a snapshot are in flight at once;
// 1 reads the ranges one after the other.
var snapshotReads = DefaultSnapshotReads

// splitChars are the characters a range of keys is split at: those of
// addresses, ports and protocol numbers in their text forms, in byte
// order. They make the pieces even; a key of any other character still
// falls in exactly one piece (splitRange).
const splitChars = "./0123456789:abcdef"

// maxSplitDepth bounds how many characters deeper than sessions/ a range
// is split, so that keys sharing a long prefix cost a bounded number of
// counting requests; a piece that is still large is read in pages.
const maxSplitDepth = 24

// snapshotRevHook, if set, is called with a snapshot's revision before
// anything is read at it (a test seam).
var snapshotRevHook func(rev int64)

// keyRange is the keys k with lo <= k < hi, n of them at the snapshot's
// revision.
type keyRange struct {
	lo, hi string
	n      int64
}

// splitWidth is how many characters deeper one split goes. A level of
// counting reads the index over every key it splits, and the first
// characters of addresses are often the same for every key (a fleet's
// clients in one 10.x.0.0/16), so a wide split saves passes; its ranges
// that hold nothing cost etcd next to nothing. At a million sessions in
// 10.0.0.0/12, three characters read a snapshot in 2.7–3.1 s where two
// took 3.5–3.6 s, the members spending 2.7–3.2 s of CPU instead of
// 3.4–4.1 (BenchmarkEtcdSnapshot, in one run).
const splitWidth = 3

// splitRange partitions r into the ranges [lo, lo+w₁), [lo+w₁, lo+w₂), …,
// [lo+wₖ, hi) for the strings wᵢ of splitWidth characters of splitChars,
// in order, with lo+wᵢ < hi. The bounds grow strictly (they share the
// prefix lo, then have the same length and increase) and lie strictly
// between lo and hi, so every key of r is in exactly one of the ranges.
// It returns nil if no bound falls inside r.
func splitRange(r keyRange) []keyRange {
	var out []keyRange
	lo := r.lo
	w := make([]byte, splitWidth)
	var add func(d int) bool
	add = func(d int) bool {
		if d == splitWidth {
			b := r.lo + string(w)
			if b >= r.hi {
				return false
			}
			out = append(out, keyRange{lo: lo, hi: b})
			lo = b
			return true
		}
		for i := range len(splitChars) {
			w[d] = splitChars[i]
			if !add(d + 1) {
				return false
			}
		}
		return true
	}
	add(0)
	if out == nil {
		return nil
	}
	return append(out, keyRange{lo: lo, hi: r.hi})
}

// countRanges counts the keys of each range at rev in read-only
// transactions of at most MaxTxnOps ranges, in parallel.
func (e *Etcd) countRanges(ctx context.Context, rev int64, rs []keyRange) error {
	var wg sync.WaitGroup
	errs := make([]error, (len(rs)+MaxTxnOps-1)/MaxTxnOps)
	for c := range errs {
		chunk := rs[c*MaxTxnOps : min(len(rs), (c+1)*MaxTxnOps)]
		wg.Go(func() { errs[c] = e.countChunk(ctx, rev, chunk) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func (e *Etcd) countChunk(ctx context.Context, rev int64, rs []keyRange) error {
	ops := make([]clientv3.Op, len(rs))
	for i, r := range rs {
		ops[i] = clientv3.OpGet(r.lo, clientv3.WithRange(r.hi), clientv3.WithCountOnly(), clientv3.WithRev(rev))
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := e.cli.Txn(rctx).Then(ops...).Commit()
	if err != nil {
		return readError(err)
	}
	if len(resp.Responses) != len(rs) {
		return fmt.Errorf("read store: %w: %d counts for %d ranges", ErrUnavailable, len(resp.Responses), len(rs))
	}
	for i, r := range resp.Responses {
		rs[i].n = r.GetResponseRange().GetCount()
	}
	return nil
}

func readError(err error) error {
	if errors.Is(err, rpctypes.ErrCompacted) {
		return fmt.Errorf("read store: %w", ErrCompacted)
	}
	return unavailable("read store", err)
}

// sessionsSnapshot reads every session at one revision and returns them,
// in no particular order, with the revision.
func (e *Etcd) sessionsSnapshot(ctx context.Context) ([]Entry, int64, error) {
	dir := e.prefix + sessionsDir
	// The revision: a linearizable read of one key, which costs etcd
	// nothing to answer.
	rctx, rcancel := context.WithTimeout(ctx, requestTimeout)
	resp, err := e.cli.Get(rctx, dir, clientv3.WithCountOnly())
	rcancel()
	if err != nil {
		return nil, 0, readError(err)
	}
	rev := resp.Header.Revision
	if snapshotRevHook != nil {
		snapshotRevHook(rev)
	}
	top := splitRange(keyRange{lo: dir, hi: clientv3.GetPrefixRangeEnd(dir)})
	if err := e.countRanges(ctx, rev, top); err != nil {
		return nil, 0, err
	}
	var total int64
	for _, r := range top {
		total += r.n
	}
	if e.sized != nil {
		e.sized(int(total))
	}
	// Pieces of at most a page, and enough of them that the requests in
	// flight stay busy until the end.
	piece := min(snapshotPage, max(total/int64(2*snapshotReads), 1000))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		slots = make(chan struct{}, snapshotReads)
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		// Each piece decodes into its own part of out, in the order the
		// pieces are found: the counts are exact at rev.
		out    = make([]Entry, total)
		next   int64
		pieces []*readPiece
	)
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
			cancel()
		}
		mu.Unlock()
	}
	var visit func(rs []keyRange, depth int)
	visit = func(rs []keyRange, depth int) {
		for _, g := range groupRanges(rs, piece) {
			if g.n > piece && depth < maxSplitDepth {
				if sub := splitRange(g); sub != nil {
					wg.Go(func() {
						slots <- struct{}{}
						err := e.countRanges(ctx, rev, sub)
						<-slots
						if err != nil {
							fail(err)
							return
						}
						visit(sub, depth+splitWidth)
					})
					continue
				}
			}
			mu.Lock()
			p := &readPiece{keyRange: g}
			if next+g.n <= total {
				p.entries = out[next : next : next+g.n]
			}
			next += g.n
			pieces = append(pieces, p)
			mu.Unlock()
			wg.Go(func() {
				slots <- struct{}{}
				defer func() { <-slots }()
				if err := e.readPiece(ctx, rev, p); err != nil {
					fail(err)
				}
			})
		}
	}
	visit(top, splitWidth)
	wg.Wait()
	if first != nil {
		return nil, 0, first
	}
	// Every piece filled its part unless a session was malformed (or a
	// count was wrong): then the parts are joined again.
	if next == total && !slices.ContainsFunc(pieces, func(p *readPiece) bool { return int64(len(p.entries)) != p.n }) {
		return out, rev, nil
	}
	var joined []Entry
	for _, p := range pieces {
		joined = append(joined, p.entries...)
	}
	return joined, rev, nil
}

// groupRanges drops the empty ranges of rs (in order, adjacent) and joins
// neighbours while together they hold at most piece keys: a union of
// adjacent ranges is one range.
func groupRanges(rs []keyRange, piece int64) []keyRange {
	var out []keyRange
	for _, r := range rs {
		if r.n == 0 {
			continue
		}
		if k := len(out) - 1; k >= 0 && out[k].n+r.n <= piece {
			out[k].hi, out[k].n = r.hi, out[k].n+r.n
			continue
		}
		out = append(out, r)
	}
	return out
}

// readPiece is one range of a snapshot and the sessions read from it.
type readPiece struct {
	keyRange
	entries []Entry
}

// readPiece reads the sessions of p at rev, in pages if it holds more
// than one.
func (e *Etcd) readPiece(ctx context.Context, rev int64, p *readPiece) error {
	users := userTable{}
	key := p.lo
	for {
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		resp, err := e.cli.Get(rctx, key, clientv3.WithRange(p.hi), clientv3.WithRev(rev), clientv3.WithLimit(snapshotPage))
		cancel()
		if err != nil {
			return readError(err)
		}
		for _, kv := range resp.Kvs {
			p.entries = append(p.entries, Entry{})
			if !e.sessionEntry(&p.entries[len(p.entries)-1], kv, users) {
				p.entries = p.entries[:len(p.entries)-1]
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// sessionEntry decodes one stored session into en; a malformed one is
// logged and skipped.
func (e *Etcd) sessionEntry(en *Entry, kv *mvccpb.KeyValue, users userTable) bool {
	k, err := parseSessionPath(strings.TrimPrefix(string(kv.Key), e.prefix))
	if err == nil {
		en.Record, _, err = decodeRecordUsers(k, kv.Value, users)
	}
	if err != nil {
		e.log.Warn().Err(err).Msg("skipping a malformed session in the store")
		return false
	}
	en.ModRev = kv.ModRevision
	return true
}
