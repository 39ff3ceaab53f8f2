package controlplane

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// With a session store (--store file:PATH or etcd:...), the store is the
// truth and the pinned maps are this gateway's cache of it. Writes go to
// the store only (storewrite.go); this loop is the one writer of the
// maps' sessions (the reaper still deletes expired ones on its own):
//
//   - Restore: read a snapshot of the store at revision R, delete from
//     the maps every session the store does not hold (it was revoked or
//     reaped while this gateway was down or cut off: deletes in the store
//     are final), write every stored session that is still live into the
//     maps (state.Maps.Apply, which keeps the map's later last_seen), and
//     rebuild the index (below). The first restore ends before the
//     control plane reports SERVING and READY=1.
//   - Apply: watch the store from R+1 and apply each change in revision
//     order: a put writes the session, a delete deletes it, another
//     gateway's activity raises last_seen (activity.go). Order alone keeps
//     a revoke final: no older put can arrive after the delete, and a
//     resync starts from a snapshot, which has no deleted session in it.
//   - Resync: after any gap (the watch failed: etcd compacted the history
//     it needed, the connection or the leader was lost, the store came
//     back after being unreachable, or the loader replaced the maps),
//     restore again from a new snapshot, then watch again.
//
// The index holds, for each stored session, its record, the revision of
// its last write, the latest activity other gateways published for it
// and what this gateway last read and published of its own. It is about
// 200 bytes a session (200 MB for a million), the price of applying
// revisions without reading the store back.

// indexEntry is one stored session as the loop knows it.
type indexEntry struct {
	rec    store.Record
	modRev int64
	// remote is the latest activity another gateway published (wall,
	// Unix ns); published the latest this gateway published; local its
	// map's last_seen when last read (data path clock).
	remote, published int64
	local             uint64
	// prev and next link the entries of the same user (storeLoop.byUser).
	prev, next *indexEntry
}

// storeLoop keeps the maps in step with the store.
type storeLoop struct {
	s     *Server
	st    store.Store
	log   zerolog.Logger
	clock store.Clock

	ackTimeout, activityInterval time.Duration

	mu    sync.Mutex
	index map[state.Key]*indexEntry
	// byUser is the first of each user's entries, which link the rest, so
	// that a revoke of a user's sessions costs that user's entries, not a
	// walk of the whole index. Changed only with index (setIndex,
	// setEntry, dropEntry).
	byUser map[string]*indexEntry
	// applied is the revision up to which every change is in the maps;
	// advanced is closed and replaced whenever it grows.
	applied  int64
	advanced chan struct{}
	// failed holds the revisions whose put this gateway could not apply
	// (a full map), for the grant that wrote it.
	failed map[int64]error
	// since is when the current unbroken watch began (wall, Unix ns): the
	// activity of every gateway since then is known.
	since int64
	gen   uint64 // the maps' generation the index was restored into

	up       atomic.Bool // the store answered at the last probe
	restored atomic.Bool // the maps were restored from the store at least once
	ready    chan struct{}
	readyOne sync.Once
	resync   chan struct{} // asks the loop to resynchronise

	m *storeMetrics

	memory     func(sessions int) // Options.StoreMemory; nil for none
	memorySize int                // the index's size memory was last told

	// Test seams: beforeReapTxn runs between the reaping's judgment and
	// its delete; reapUnconditional drops the revision condition of that
	// delete, to show what the condition prevents.
	beforeReapTxn     func()
	reapUnconditional bool
}

func newStoreLoop(s *Server, o *Options) *storeLoop {
	l := &storeLoop{s: s, st: o.Store, log: o.Log.With().Str("component", "store").Logger(), clock: o.Clock,
		ackTimeout: o.AckTimeout, activityInterval: o.ActivityInterval,
		index: map[state.Key]*indexEntry{}, byUser: map[string]*indexEntry{}, advanced: make(chan struct{}), failed: map[int64]error{},
		ready: make(chan struct{}), resync: make(chan struct{}, 1), memory: o.StoreMemory}
	l.m = newStoreMetrics(l)
	return l
}

// Ready is closed once the maps were first restored from the store.
func (l *storeLoop) Ready() <-chan struct{} { return l.ready }

// serving reports whether session writes can go through the store now.
func (l *storeLoop) serving() bool { return l.up.Load() && l.restored.Load() }

func (l *storeLoop) run(ctx context.Context) {
	go l.probe(ctx)
	go l.activityLoop(ctx)
	lastErr := ""
	for ctx.Err() == nil {
		rev, err := l.restore(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// Once per distinct error, not once a second.
			if err.Error() != lastErr {
				l.log.Warn().Err(err).Msg("restore from the store failed; the maps keep enforcing what they hold, retrying every second")
				lastErr = err.Error()
			}
			sleepCtx(ctx, time.Second)
			continue
		}
		lastErr = ""
		err = l.follow(ctx, rev)
		if ctx.Err() != nil {
			return
		}
		reason := "error"
		switch {
		case errors.Is(err, store.ErrCompacted):
			reason = "compacted"
		case errors.Is(err, errResync):
			reason = "requested"
		}
		l.m.resyncs.WithLabelValues(reason).Inc()
		l.log.Warn().Err(err).Str("reason", reason).Msg("store watch ended: resynchronising from a snapshot")
	}
}

var errResync = errors.New("resynchronisation requested")

// requestResync makes the loop restore again (the store came back, the
// maps were replaced).
func (l *storeLoop) requestResync() {
	select {
	case l.resync <- struct{}{}:
	default:
	}
}

// probe asks the store every second whether it answers, and asks for a
// resync when it comes back: whatever the watch missed meanwhile.
func (l *storeLoop) probe(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		err := l.st.Probe(ctx)
		if ctx.Err() != nil {
			return
		}
		was := l.up.Swap(err == nil)
		switch {
		case err != nil && was:
			l.log.Error().Err(err).Msg("session store unreachable: grants and revokes refused (Unavailable), the maps keep enforcing what they hold")
		case err == nil && !was:
			l.log.Info().Msg("session store reachable")
			if l.restored.Load() {
				l.requestResync()
			}
		}
		if l.restored.Load() && l.s.maps.Generation() != l.genSeen() {
			l.requestResync()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (l *storeLoop) genSeen() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gen
}

// restore rebuilds the maps and the index from a snapshot and returns its
// revision.
func (l *storeLoop) restore(ctx context.Context) (int64, error) {
	select {
	case <-l.resync: // this restore is the one asked for
	default:
	}
	l.mu.Lock()
	l.sized(len(l.index))
	l.mu.Unlock()
	start := time.Now()
	snap, err := l.st.Snapshot(ctx)
	if err != nil {
		return 0, err
	}
	read := time.Since(start)
	l.mu.Lock()
	l.sized(len(snap.Entries))
	l.mu.Unlock()
	idx := make(map[state.Key]*indexEntry, len(snap.Entries))
	// One allocation for the whole index rather than one a session.
	slab := make([]indexEntry, len(snap.Entries))
	for i := range snap.Entries {
		e := &snap.Entries[i]
		slab[i] = indexEntry{rec: e.Record, modRev: e.ModRev}
		idx[e.Key] = &slab[i]
	}
	for _, a := range snap.Activity {
		if e := idx[a.Key]; e != nil {
			e.remote = max(e.remote, a.LastSeen)
		}
	}
	// The index holds all of it now: the snapshot's memory (a hundred
	// bytes a session) is free for the writes below.
	snap.Entries, snap.Activity = nil, nil
	l.mu.Lock()
	// What the old index learned of activity still counts for the same
	// session.
	for k, e := range idx {
		if old := l.index[k]; old != nil && old.rec.Created == e.rec.Created && old.rec.User == e.rec.User {
			e.remote, e.published = max(e.remote, old.remote), old.published
		}
	}
	l.mu.Unlock()

	var removed, written, skipped int
	var gen uint64
	err = l.s.maps.Do(func(m *state.Maps) error {
		gen = l.s.maps.Generation()
		cfg, err := m.ReadConfig()
		if err != nil {
			return err
		}
		var stale []state.Key
		local := map[state.Key]uint64{}
		for s, err := range m.Sessions() {
			if err != nil {
				return err
			}
			if idx[s.Key] == nil {
				stale = append(stale, s.Key)
			} else {
				local[s.Key] = s.LastSeen
			}
		}
		for _, k := range stale {
			if err := m.Revoke(k); err == nil {
				removed++
			}
		}
		clock := l.clock.Pair()
		now := clock.Wall()
		failed := func(s state.Session, err error) {
			l.log.Error().Err(err).Stringer("session", s.Key).Msg("restore session into the maps")
			l.m.applyErrors.Inc()
		}
		// Sessions the maps lack (all of them after a reboot) go in
		// batches; those the maps hold are merged one by one.
		fresh := make([]state.Session, 0, len(idx)-len(local))
		for k, e := range idx {
			seen := e.remote
			ls, held := local[k]
			if held {
				e.local = ls
				seen = max(seen, clock.ToWall(ls))
			}
			if e.rec.Expired(seen, cfg.DefaultIdleTimeout, now) {
				skipped++
				continue
			}
			s := storedSession(&e.rec, seen, clock)
			if !held {
				fresh = append(fresh, s)
				continue
			}
			if err := m.Apply(s); err != nil {
				failed(s, err)
				continue
			}
			written++
		}
		written += m.InsertNew(fresh, failed)
		return nil
	})
	if err != nil {
		return 0, err
	}
	l.mu.Lock()
	l.setIndex(idx)
	l.gen, l.since = gen, l.clock.NowWall()
	l.advance(snap.Rev)
	l.mu.Unlock()
	l.st.SetApplied(snap.Rev)
	l.log.Info().Int64("revision", snap.Rev).Int("sessions", len(idx)).Int("written", written).
		Int("expired", skipped).Int("removed", removed).Dur("read", read).Dur("took", time.Since(start)).
		Msg("maps restored from the store")
	l.restored.Store(true)
	l.readyOne.Do(func() { close(l.ready) })
	return snap.Rev, nil
}

// sized tells Options.StoreMemory that the index holds or is about to
// hold n sessions, when n grew by an eighth since it was last told, or
// fell below half; call with l.mu held.
func (l *storeLoop) sized(n int) {
	if l.memory == nil || (n <= l.memorySize+l.memorySize/8 && n >= l.memorySize/2) {
		return
	}
	l.memorySize = n
	l.memory(n)
}

// advance records that every change up to rev is applied; call with l.mu
// held.
func (l *storeLoop) advance(rev int64) {
	if rev <= l.applied {
		return
	}
	l.applied = rev
	close(l.advanced)
	l.advanced = make(chan struct{})
	for r := range l.failed {
		if r < rev-1000 {
			delete(l.failed, r)
		}
	}
}

// storedSession converts a stored record to the maps' form, last seen at seen
// (wall) or later.
func storedSession(r *store.Record, seen int64, clock store.Pair) state.Session {
	s := state.Session{Key: r.Key, User: r.User, IdleTimeout: r.IdleTimeout,
		Created:  clock.ToMono(r.Created),
		LastSeen: clock.ToMono(max(r.LastSeen, seen)),
	}
	if r.Expires != 0 {
		s.Expires = clock.ToMono(r.Expires)
	}
	return s
}

// follow applies the store's changes after rev until the watch ends.
func (l *storeLoop) follow(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := l.st.Watch(wctx, rev)
	for {
		select {
		case <-l.resync:
			return errResync
		case b, ok := <-ch:
			if !ok {
				return errors.New("watch closed")
			}
			if b.Err != nil {
				return b.Err
			}
			if err := l.apply(&b); err != nil {
				return err
			}
		}
	}
}

// apply writes one batch into the maps and the index.
func (l *storeLoop) apply(b *store.Batch) error {
	if len(b.Events) == 0 {
		// Progress, or other gateways' liveness keys: nothing to write.
		l.mu.Lock()
		l.advance(b.Rev)
		l.mu.Unlock()
		return nil
	}
	sessions := false
	err := l.s.maps.Do(func(m *state.Maps) error {
		if l.s.maps.Generation() != l.genSeen() {
			return errResync
		}
		cfg, err := m.ReadConfig()
		if err != nil {
			return err
		}
		clock := l.clock.Pair()
		for i := range b.Events {
			ev := &b.Events[i]
			switch ev.Type {
			case store.Put:
				sessions = true
				l.put(m, &ev.Entry, cfg.DefaultIdleTimeout, clock)
			case store.Delete:
				sessions = true
				l.mu.Lock()
				l.dropEntry(ev.Entry.Key)
				l.mu.Unlock()
				if err := m.Revoke(ev.Entry.Key); err != nil && !errors.Is(err, state.ErrNotFound) {
					l.log.Error().Err(err).Stringer("session", ev.Entry.Key).Msg("apply revoke to the maps")
					l.m.applyErrors.Inc()
				}
			case store.ActivityEvent:
				l.touch(m, ev.Activity, cfg.DefaultIdleTimeout, clock)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.advance(b.Rev)
	l.mu.Unlock()
	if sessions {
		l.st.SetApplied(b.Rev)
	}
	return nil
}

func (l *storeLoop) put(m *state.Maps, e *store.Entry, defaultIdle time.Duration, clock store.Pair) {
	l.mu.Lock()
	ie := l.index[e.Key]
	if ie == nil || ie.rec.Created != e.Created || ie.rec.User != e.User {
		ie = &indexEntry{rec: e.Record}
		l.setEntry(ie)
		l.sized(len(l.index))
	}
	ie.rec, ie.modRev = e.Record, e.ModRev
	seen := ie.remote
	l.mu.Unlock()
	if e.Expired(seen, defaultIdle, clock.Wall()) {
		return // the data path would refuse it; the store's reaping removes it
	}
	if err := m.Apply(storedSession(&e.Record, seen, clock)); err != nil {
		l.log.Error().Err(err).Stringer("session", e.Key).Int64("revision", e.ModRev).Msg("apply grant to the maps")
		l.m.applyErrors.Inc()
		l.mu.Lock()
		l.failed[e.ModRev] = err
		l.mu.Unlock()
	}
}

// waitApplied waits until the maps hold every change up to rev, and
// returns the error of applying rev's put here, if any.
func (l *storeLoop) waitApplied(ctx context.Context, rev int64) error {
	for {
		l.mu.Lock()
		if l.applied >= rev {
			err := l.failed[rev]
			delete(l.failed, rev)
			l.mu.Unlock()
			return err
		}
		ch := l.advanced
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// close publishes this gateway's activity a last time, so that a reboot
// restores how idle each session really was, and closes the store.
func (l *storeLoop) close(ctx context.Context) {
	if l.serving() {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		l.publish(pctx)
		cancel()
	}
	if l.s.storeStop != nil {
		l.s.storeStop()
	}
	if err := l.st.Close(); err != nil {
		l.log.Warn().Err(err).Msg("close the session store")
	}
}

// setIndex replaces the index with idx; call with l.mu held.
func (l *storeLoop) setIndex(idx map[state.Key]*indexEntry) {
	l.index, l.byUser = idx, make(map[string]*indexEntry)
	for _, e := range idx {
		l.link(e)
	}
}

// setEntry puts e under its key, in place of the entry there; call with
// l.mu held.
func (l *storeLoop) setEntry(e *indexEntry) {
	l.dropEntry(e.rec.Key)
	l.index[e.rec.Key] = e
	l.link(e)
}

// dropEntry removes the entry of k, if any; call with l.mu held.
func (l *storeLoop) dropEntry(k state.Key) {
	e := l.index[k]
	if e == nil {
		return
	}
	delete(l.index, k)
	if e.prev != nil {
		e.prev.next = e.next
	} else if e.next != nil {
		l.byUser[e.rec.User] = e.next
	} else {
		delete(l.byUser, e.rec.User)
	}
	if e.next != nil {
		e.next.prev = e.prev
	}
	e.prev, e.next = nil, nil
}

func (l *storeLoop) link(e *indexEntry) {
	e.prev, e.next = nil, l.byUser[e.rec.User]
	if e.next != nil {
		e.next.prev = e
	}
	l.byUser[e.rec.User] = e
}
