package controlplane

import (
	"context"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/internal/store"
)

// Activity and reaping with a store.
//
// Each gateway's data path writes last_seen into its own maps only. So
// that a session does not expire on gateway B right after a failover
// because its traffic used to go through A, every --activity-interval
// each gateway reads its maps once and publishes the latest last_seen of
// every session it saw pass traffic (store.PublishActivity: etcd packs
// them into a few values of at most 768 KiB, and writes only those whose
// content changed; the file store raises the stored last-seen times). The
// other gateways raise their own last_seen to it, never lower it, and
// never revive a session their data path already refuses (state.Maps.
// Touch).
//
// The guarantee: a session that passed traffic through any gateway within
// (idle timeout - activity interval) is live on every gateway that has
// applied that gateway's last publication, so it survives a failover. At
// a million active sessions and 10 s, that is a million 20-byte entries
// (about 27 values of 768 KiB) per interval for the whole fleet: under 3
// requests a second, whatever the number of gateways.
//
// Reaping: the data path refuses an expired session at once and the
// reaper deletes it from the maps, each gateway on its own. Removing it
// from the store is this loop's: a stored session is reaped when it is
// past its lifetime, or idle longer than its idle timeout by the latest
// activity known of every gateway. Idle reaping waits an extra two
// intervals (the other gateways' publications in flight), and, with a
// shared store, for this gateway to have watched the store unbroken for
// the idle timeout and those two intervals, so that it knows every
// activity in the window. (A gateway alone with a file store reads all
// activity from its own maps and waits for nothing.) The delete is a transaction conditioned on the
// session's revision, so a grant in between is not deleted, and only one
// gateway's delete of a session succeeds; the first live gateway by name
// reaps, the others only what it left for three more intervals.

// reapBatch is how many deletes one reaping transaction carries.
const reapBatch = 64

func (l *storeLoop) activityLoop(ctx context.Context) {
	t := time.NewTicker(l.activityInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !l.serving() {
			continue
		}
		l.publish(ctx)
		l.reap(ctx)
	}
}

// publish reads the maps' last_seen and publishes this gateway's
// activity.
func (l *storeLoop) publish(ctx context.Context) {
	var all, changed []store.Activity
	clock := l.clock.Pair()
	err := l.s.maps.Do(func(m *state.Maps) error {
		if l.s.maps.Generation() != l.genSeen() {
			return nil
		}
		// The lock is taken per session, not across the walk, so that
		// grants and the apply loop are not held up by a large map. A
		// walk of a million sessions takes seconds: it gives up when ctx
		// ends (a shutdown bounds its last publication so).
		n := 0
		for s, err := range m.Sessions() {
			if err != nil {
				return err
			}
			if n++; n%4096 == 0 && ctx.Err() != nil {
				return ctx.Err()
			}
			l.mu.Lock()
			e := l.index[s.Key]
			if e != nil && s.LastSeen != e.local {
				e.local = s.LastSeen
				// Only traffic counts: the grant's own stamp is in the record.
				if w := clock.ToWall(s.LastSeen); w > e.published && w > e.rec.LastSeen+int64(time.Second) {
					e.published = w
					changed = append(changed, store.Activity{Key: s.Key, LastSeen: w})
				}
			}
			l.mu.Unlock()
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.st.Shared() {
			for k, e := range l.index {
				if e.published != 0 {
					all = append(all, store.Activity{Key: k, LastSeen: e.published})
				}
			}
		}
		return nil
	})
	if err != nil {
		l.log.Warn().Err(err).Msg("read the maps' activity")
		return
	}
	if err := l.st.PublishActivity(ctx, all, changed); err != nil {
		l.m.activity.WithLabelValues("error").Inc()
		l.log.Warn().Err(err).Msg("publish activity")
		return
	}
	l.m.activity.WithLabelValues("published").Inc()
}

// touch raises the maps' last_seen to another gateway's activity.
func (l *storeLoop) touch(m *state.Maps, acts []store.Activity, defaultIdle time.Duration, clock store.Pair) {
	now := state.Now()
	for _, a := range acts {
		l.mu.Lock()
		e := l.index[a.Key]
		var local uint64
		if e != nil {
			e.remote = max(e.remote, a.LastSeen)
			local = e.local
		}
		l.mu.Unlock()
		if e == nil {
			continue
		}
		// What this gateway read last is newer: nothing to raise.
		if local != 0 && clock.ToWall(local) >= a.LastSeen {
			continue
		}
		if _, err := m.Touch(a.Key, clock.ToMono(a.LastSeen), uint64(defaultIdle), now); err == nil {
			l.m.touched.Inc()
		}
	}
}

// reap removes from the store the sessions expired everywhere.
func (l *storeLoop) reap(ctx context.Context) {
	var defaultIdle time.Duration
	if err := l.s.maps.Do(func(m *state.Maps) error {
		cfg, err := m.ReadConfig()
		defaultIdle = cfg.DefaultIdleTimeout
		return err
	}); err != nil {
		return
	}
	// One gateway alone knows all activity from its own maps: no grace.
	var grace time.Duration
	if l.st.Shared() {
		grace = 2 * l.activityInterval
		if !l.firstReaper() {
			grace += 3 * l.activityInterval
		}
	}
	clock := l.clock.Pair()
	now := clock.Wall()
	var ops []store.Op
	l.mu.Lock()
	for k, e := range l.index {
		expired := e.rec.Expires != 0 && now >= e.rec.Expires
		if !expired {
			idle := e.rec.IdleTimeout
			if idle == 0 {
				idle = defaultIdle
			}
			seen := max(e.rec.LastSeen, e.remote, e.published)
			if e.local != 0 {
				seen = max(seen, clock.ToWall(e.local))
			}
			watched := !l.st.Shared() || now-l.since > int64(idle+grace)
			expired = watched && now-seen > int64(idle+grace)
		}
		if expired {
			ops = append(ops, store.Op{Record: store.Record{Key: k}, Delete: true, IfModRev: e.modRev})
		}
	}
	l.mu.Unlock()
	if l.beforeReapTxn != nil && len(ops) > 0 {
		l.beforeReapTxn()
	}
	if l.reapUnconditional {
		for i := range ops {
			ops[i].IfModRev = -1
		}
	}
	for len(ops) > 0 && ctx.Err() == nil {
		batch := ops[:min(len(ops), reapBatch)]
		ops = ops[len(batch):]
		if _, err := l.st.Txn(ctx, batch); err == nil {
			l.m.reaped.Add(float64(len(batch)))
			continue
		}
		// One of them changed (a grant, another gateway's reaping): one
		// by one, so that the others still go.
		for i := range batch {
			if _, err := l.st.Txn(ctx, batch[i:i+1]); err == nil {
				l.m.reaped.Inc()
			}
		}
	}
}

// firstReaper reports whether this gateway's name is the first among the
// live gateways'.
func (l *storeLoop) firstReaper() bool {
	p, ok := l.st.(interface{ Peers() map[string]int64 })
	if !ok {
		return true
	}
	for id := range p.Peers() {
		if id < l.s.opts.Gateway {
			return false
		}
	}
	return true
}
