package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// Writes with a store. Both gRPC services' grants and revokes come here
// when --store is set. What an OK means:
//
//  1. The write is in the store: committed by the etcd quorum, or
//     fsynced into the file store. A store that cannot be reached, or has
//     not been restored from yet, refuses it with Unavailable and nothing
//     is written anywhere: never a write to one gateway's maps only.
//  2. It is in this gateway's maps: the apply loop (storeloop.go) applied
//     every change up to the write's revision, so the next packet of a
//     granted session passes here, and a revoked one is dropped.
//  3. With etcd, every other live gateway (a key on a lease under
//     gateways/) has published an applied revision at least the write's,
//     or --store-ack-timeout passed. On that timeout the call still
//     returns OK: the write is committed and in effect here, the lagging
//     gateways apply it when they catch up (or drop out of the live set
//     when their lease expires), and a retry by the controller could not
//     make them faster. The timeout is logged with the lagging gateways'
//     names and counted in aegis_store_ack_timeouts_total.
//
// The check of who holds a session (claim) reads this gateway's maps, as
// without a store, and the write is conditioned on the session's
// revision as this gateway applied it: a concurrent write of the same key
// through another gateway fails the condition, and the grant gets Aborted
// (retry) rather than silently replacing what it did not check.

// errConflict is commit's error for a write whose condition failed: the
// session changed in the store since this gateway applied it.
var errConflict = status.Error(codes.Aborted, "the session changed meanwhile in the store (another gateway wrote it, or it expired and was reaped): retry")

// grantAttempts is how often a grant is judged again after its write lost
// a race (errConflict): the session was reaped or rewritten meanwhile, and
// once this gateway applied that, the grant is judged on it.
const grantAttempts = 3

// localApplyTimeout bounds the wait for this gateway's own apply of a
// write it committed: the watch delivers within milliseconds unless the
// store went away right after the commit.
const localApplyTimeout = 5 * time.Second

// commit writes ops to the store and waits for this gateway's apply. It
// returns the revision (0 if the ops changed nothing) and, for a put this
// gateway could not apply, that error.
func (l *storeLoop) commit(ctx context.Context, ops []store.Op) (int64, error) {
	if err := l.writable(); err != nil {
		return 0, err
	}
	ctx = context.WithoutCancel(ctx)
	rev, err := l.st.Txn(ctx, ops)
	switch {
	case errors.Is(err, store.ErrConflict):
		return rev, errConflict
	case errors.Is(err, store.ErrUnavailable):
		// A request that timed out may still commit once etcd has its
		// quorum again, on every gateway alike: the caller cannot
		// know, so it must not be told that nothing happened.
		return 0, status.Errorf(codes.Unavailable, "%v: the store did not confirm the write; it may still take effect on every gateway once the store is back, so repeat the call (it is idempotent) or revoke", err)
	case err != nil:
		return 0, status.Error(codes.Internal, err.Error())
	case rev == 0:
		return 0, nil
	}
	wctx, cancel := context.WithTimeout(ctx, localApplyTimeout)
	defer cancel()
	if err := l.waitApplied(wctx, rev); err != nil {
		if wctx.Err() != nil {
			return rev, status.Errorf(codes.Unavailable,
				"written to the store at revision %d but not applied to this gateway's maps within %v: it will be once the store is reachable", rev, localApplyTimeout)
		}
		return rev, err
	}
	return rev, nil
}

// writable refuses writes while the store cannot take them: before
// anything else about a request is judged, so that an unreachable store
// always answers Unavailable.
func (l *storeLoop) writable() error {
	if !l.restored.Load() {
		return status.Error(codes.Unavailable, "session store: the maps are not restored from the store yet")
	}
	if !l.up.Load() {
		return status.Error(codes.Unavailable, "session store unreachable: grants and revokes are refused until it is back; the maps keep enforcing what they hold")
	}
	return nil
}

// confirm returns err, a refusal judged on what this gateway applied of
// the store (the session is another user's, there is no such session),
// once the store answers a linearizable read: within the second before
// the probe notices a partition, this gateway's view may be stale, and
// the answer is then Unavailable like every other write's.
func (l *storeLoop) confirm(err error) error {
	if err == nil {
		return nil
	}
	if c := status.Code(err); c != codes.AlreadyExists && c != codes.NotFound && !errors.Is(err, state.ErrNotFound) {
		return err
	}
	if perr := l.st.Probe(context.Background()); perr != nil {
		return status.Errorf(codes.Unavailable, "%v: cannot confirm the refusal (%v)", perr, status.Convert(err).Message())
	}
	return err
}

// ack waits for the other live gateways to apply rev (see the top of this
// file); call it with no lock held. A nil loop (no store) waits for nothing.
func (l *storeLoop) ack(rev int64, op string) {
	if l == nil || rev == 0 || !l.st.Shared() { // no store: nothing to wait for
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.ackTimeout)
	defer cancel()
	if lagging := l.st.WaitApplied(ctx, rev); len(lagging) > 0 {
		l.m.ackTimeouts.Inc()
		l.log.Warn().Str("op", op).Int64("revision", rev).Strs("lagging_gateways", lagging).Stringer("ack_timeout", l.ackTimeout).
			Msg("acknowledged without every live gateway's apply: they apply it when they catch up")
	}
}

// record is a session's stored form; a refresh of the user's own session
// keeps its creation time.
func (l *storeLoop) record(s *state.Session) (store.Record, int64) {
	r := store.Record{Key: s.Key, User: s.User, Created: l.clock.ToWall(s.Created), LastSeen: l.clock.ToWall(s.LastSeen),
		IdleTimeout: s.IdleTimeout}
	if s.Expires != 0 {
		r.Expires = l.clock.ToWall(s.Expires)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.index[s.Key]; e != nil {
		if e.rec.User == s.User {
			r.Created = e.rec.Created
		}
		return r, e.modRev
	}
	return r, 0
}

// grant writes sess through the store after cl's check, under the
// caller's key locks; it returns the session as the maps now hold it, and
// the revision to ack once the locks are released. The maps are not held
// open across the wait for the apply loop, which needs them.
func (l *storeLoop) grant(cl *claim, sess state.Session) (stored state.Session, created bool, rev int64, err error) {
	for range grantAttempts {
		stored, created, rev, err = l.grantOnce(cl, sess)
		if err != errConflict {
			return stored, created, rev, err
		}
		// Judged again on the change that won, once it is applied here.
		wctx, cancel := context.WithTimeout(context.Background(), localApplyTimeout)
		werr := l.waitApplied(wctx, rev)
		cancel()
		if werr != nil && wctx.Err() != nil {
			break
		}
		*cl = claim{s: cl.s, user: cl.user}
	}
	return stored, false, 0, errConflict
}

func (l *storeLoop) grantOnce(cl *claim, sess state.Session) (stored state.Session, created bool, rev int64, err error) {
	if err := l.writable(); err != nil {
		return stored, false, 0, err
	}
	err = l.s.maps.Do(func(m *state.Maps) error {
		cl.m = m
		if err := cl.checkOverlapping(m, sess.Key); err != nil {
			return err
		}
		old, err := m.Lookup(sess.Key)
		switch {
		case err == nil:
			return cl.check(&old)
		case errors.Is(err, state.ErrNotFound):
			created = true
			return nil
		}
		return err
	})
	if err != nil {
		return stored, false, 0, l.confirm(err)
	}
	rec, mod := l.record(&sess)
	rev, err = l.commit(context.Background(), []store.Op{{Record: rec, IfModRev: mod}})
	if err == errConflict {
		return stored, false, rev, err
	}
	if err != nil {
		if rev != 0 && errors.Is(err, state.ErrFull) {
			// Not here, so not anywhere: take it back unless rewritten.
			if _, derr := l.st.Txn(context.Background(), []store.Op{{Record: rec, Delete: true, IfModRev: rev}}); derr != nil {
				l.log.Warn().Err(derr).Stringer("session", sess.Key).Msg("take back a grant this gateway's full map refused")
			}
		}
		return stored, false, 0, err
	}
	stored = sess
	_ = l.s.maps.Do(func(m *state.Maps) error {
		if got, err := m.Lookup(sess.Key); err == nil {
			stored = got
		}
		return nil
	})
	return stored, created, rev, nil
}

// stored reports whether the store holds a session at k, as applied here,
// and its user.
func (l *storeLoop) stored(k state.Key) (string, int64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.index[k]; e != nil {
		return e.rec.User, e.modRev, true
	}
	return "", 0, false
}

// revoke deletes the sessions at keys that the store holds; with user set,
// only if they are that user's (conditioned on their revision). It
// returns which were deleted, and the revision to ack.
func (l *storeLoop) revoke(keys []state.Key, user string) (deleted []bool, owners []string, rev int64, err error) {
	deleted, owners = make([]bool, len(keys)), make([]string, len(keys))
	if err := l.writable(); err != nil {
		return deleted, owners, 0, err
	}
	var ops []store.Op
	var idx []int
	for i, k := range keys {
		owner, mod, ok := l.stored(k)
		if !ok {
			continue
		}
		owners[i] = owner
		if user != "" && owner != user {
			continue
		}
		cond := int64(-1) // a revoke wins over anything but a change of owner
		if user != "" {
			cond = mod
		}
		ops = append(ops, store.Op{Record: store.Record{Key: k}, Delete: true, IfModRev: cond})
		idx = append(idx, i)
	}
	if len(ops) == 0 {
		// Nothing to revoke, by this gateway's view: confirmed below.
		return deleted, owners, 0, l.confirm(state.ErrNotFound)
	}
	for len(ops) > 0 {
		n := min(len(ops), store.MaxTxnOps)
		r, err := l.commit(context.Background(), ops[:n])
		if err != nil {
			return deleted, owners, rev, err
		}
		for _, i := range idx[:n] {
			deleted[i] = r != 0
		}
		rev = max(rev, r)
		ops, idx = ops[n:], idx[n:]
	}
	return deleted, owners, rev, nil
}

// userKeys lists the stored sessions of user.
func (l *storeLoop) userKeys(user string) []state.Key {
	l.mu.Lock()
	defer l.mu.Unlock()
	var keys []state.Key
	for e := l.byUser[user]; e != nil; e = e.next {
		keys = append(keys, e.rec.Key)
	}
	return keys
}

// move moves the stored sessions whose destination is a key of moves, as
// state.Maps.MoveDestinations does in the maps: a moving session whose
// new key holds a session that is not moving itself is deleted, and the
// one there kept (superseded). A swap (a to b, b to a) swaps: a key that
// receives a moved session is overwritten, not deleted (etcd refuses two
// writes of one key in a transaction anyway).
func (l *storeLoop) move(moves map[netip.Addr]netip.Addr) (state.MoveResult, int64, error) {
	var res state.MoveResult
	if err := l.writable(); err != nil {
		return res, 0, err
	}
	for from, to := range moves {
		if from.Is4() != to.Is4() || !from.IsValid() || !to.IsValid() || from.IsUnspecified() || to.IsUnspecified() {
			return res, 0, fmt.Errorf("%w: cannot move %s to %s", state.ErrInvalid, from, to)
		}
	}
	type pending struct {
		from  state.Key
		e     indexEntry
		to    state.Key
		taken int64 // the new key's revision; 0 when free
	}
	l.mu.Lock()
	var ps []pending
	moving := map[state.Key]bool{}
	for k, e := range l.index {
		if to, ok := moves[k.Dst]; ok && to != k.Dst {
			nk := k
			nk.Dst = to
			ps = append(ps, pending{from: k, e: *e, to: nk})
			moving[k] = true
		}
	}
	targets, deleted := map[state.Key]bool{}, map[state.Key]bool{}
	var groups [][]store.Op
	for i := range ps {
		p := &ps[i]
		if t := l.index[p.to]; t != nil {
			p.taken = t.modRev
		}
		if (p.taken != 0 && !moving[p.to]) || targets[p.to] {
			res.Superseded++
			deleted[p.from] = true
			groups = append(groups, []store.Op{{Record: store.Record{Key: p.from}, Delete: true, IfModRev: p.e.modRev}})
			continue
		}
		targets[p.to] = true
		rec := p.e.rec
		rec.Key = p.to
		groups = append(groups, []store.Op{{Record: rec, IfModRev: p.taken}})
		res.Moved++
	}
	for i := range ps {
		p := &ps[i]
		if !targets[p.from] && !deleted[p.from] {
			groups = append(groups, []store.Op{{Record: store.Record{Key: p.from}, Delete: true, IfModRev: p.e.modRev}})
		}
	}
	l.mu.Unlock()
	var rev int64
	var ops []store.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		r, err := l.commit(context.Background(), ops)
		rev, ops = max(rev, r), ops[:0]
		return err
	}
	for _, g := range groups {
		if len(ops)+len(g) > store.MaxTxnOps {
			if err := flush(); err != nil {
				return state.MoveResult{}, rev, err
			}
		}
		ops = append(ops, g...)
	}
	if err := flush(); err != nil {
		return state.MoveResult{}, rev, err
	}
	return res, rev, nil
}
