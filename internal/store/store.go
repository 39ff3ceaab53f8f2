// Package store keeps the sessions of a gateway, or of a fleet of
// gateways, outside the data path's maps, so that a reboot logs no one out
// and every gateway of a fleet enforces the same sessions.
//
// The maps stay what the data path reads; with a store they are a cache
// that the control plane can always rebuild from it (package controlplane,
// storeloop.go). Two stores implement Store: File, an embedded bbolt
// database for one gateway, and Etcd, an etcd cluster that a fleet
// shares. Both number their writes with a revision that only grows, and
// deliver the changes after a revision in order (Watch), so a cache that
// applied up to revision R knows what it lacks.
//
// Times are wall-clock nanoseconds (Unix): the data path's clock is
// monotonic and starts again at boot, so a stored monotonic stamp would
// mean nothing after a reboot. The control plane converts at the edge of
// the maps (Clock), counting the time the gateway was down as idle time.
package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
)

// Errors returned by the stores; test for them with errors.Is.
var (
	// ErrUnavailable means the store could not be reached or did not
	// answer in time; nothing is known to have been written.
	ErrUnavailable = errors.New("session store unavailable")
	// ErrConflict means a conditional write found the session changed
	// since the revision it was conditioned on; nothing was written.
	ErrConflict = errors.New("session changed in the store meanwhile")
	// ErrCompacted means a watch cannot deliver every change after the
	// revision it was asked for: the history is gone (etcd compaction) or
	// the watcher fell behind. Read a Snapshot again.
	ErrCompacted = errors.New("store history compacted: resynchronise from a snapshot")
	// ErrInvalidSpec means a --store value is malformed.
	ErrInvalidSpec = errors.New("invalid store")
)

// Record is one session as stored. Times are Unix nanoseconds, wall clock.
type Record struct {
	Key  state.Key
	User string
	// Created is when the session was first granted; LastSeen when it was
	// granted or refreshed, raised by the activity that gateways publish.
	Created, LastSeen int64
	// Expires is the end of the session's lifetime; 0 for none.
	Expires int64
	// IdleTimeout is the session's own idle timeout; 0 for the gateway's
	// default (its config map's).
	IdleTimeout time.Duration
}

// Entry is a stored record and the revision of its last write.
type Entry struct {
	Record
	ModRev int64
}

// Activity says that a session passed traffic at LastSeen (Unix
// nanoseconds), as one gateway's data path saw it.
type Activity struct {
	Key      state.Key
	LastSeen int64
}

// EventType is what an Event reports.
type EventType uint8

// The kinds of change a watch delivers.
const (
	// Put: the session was granted or refreshed; Entry holds it.
	Put EventType = iota + 1
	// Delete: the session was revoked or reaped; Entry.Key names it.
	Delete
	// Activity: Gateway published the activity in Activity (another
	// gateway's; a store never returns a gateway's own).
	ActivityEvent
)

// Event is one change.
type Event struct {
	Type     EventType
	Entry    Entry
	Gateway  string
	Activity []Activity
}

// Batch is what a watch delivers: the events of one or more revisions, in
// order, and the revision up to which the watcher has now seen every
// session change. A batch with Err set is the last.
type Batch struct {
	Events []Event
	Rev    int64
	Err    error
}

// Snapshot is every stored session as of one revision, with the activity
// the other gateways published last.
type Snapshot struct {
	Entries  []Entry
	Activity []Activity
	Rev      int64
}

// Op is one write of a transaction (Txn).
type Op struct {
	// Record to put, or, with Delete set, the key to delete.
	Record Record
	Delete bool
	// IfModRev conditions the op: -1 for none, 0 for "the key is
	// absent", otherwise the key's last write must be this revision.
	IfModRev int64
}

// Store is a session store. Its methods may be called concurrently.
type Store interface {
	// Snapshot reads every session.
	Snapshot(ctx context.Context) (Snapshot, error)
	// Watch delivers every change after rev, in order, until ctx ends
	// or an error (ErrCompacted, ErrUnavailable), sent as the last batch
	// before the channel closes.
	Watch(ctx context.Context, rev int64) <-chan Batch
	// Txn applies ops all or none and returns the revision they were
	// written at (0 if they changed nothing). Returns ErrConflict,
	// writing nothing, if a condition fails, with the store's current
	// revision, which a watcher reaches once it has seen the change that
	// failed it. At most MaxTxnOps ops.
	Txn(ctx context.Context, ops []Op) (rev int64, err error)
	// PublishActivity records this gateway's activity: all is every
	// session it saw pass traffic with its latest time (a shared store
	// publishes it; nil for a store that is not shared), changed those
	// whose time advanced since the last call.
	PublishActivity(ctx context.Context, all, changed []Activity) error
	// SetApplied tells the other gateways that this one has applied every
	// change up to rev to its maps.
	SetApplied(rev int64)
	// WaitApplied waits until every other live gateway has applied rev,
	// or ctx ends; it returns the gateways that had not.
	WaitApplied(ctx context.Context, rev int64) (lagging []string)
	// Probe checks that the store answers.
	Probe(ctx context.Context) error
	// Shared reports whether other gateways use the store too.
	Shared() bool
	Close() error
}

// MaxTxnOps is the most ops of one Txn: etcd's default --max-txn-ops.
const MaxTxnOps = 128

// Spec is a parsed --store value.
type Spec struct {
	// Kind is "none", "file" or "etcd".
	Kind string
	// Path of a file store.
	Path string
	// Endpoints of an etcd store.
	Endpoints []string
}

// ParseSpec parses none, file:PATH or etcd:ENDPOINT[,ENDPOINT...], where
// an ENDPOINT is https://HOST:PORT or http://HOST:PORT.
//
// Returns ErrInvalidSpec for anything else.
func ParseSpec(s string) (Spec, error) {
	kind, rest, _ := strings.Cut(s, ":")
	switch kind {
	case "", "none":
		if rest != "" {
			return Spec{}, fmt.Errorf("%w %q: none takes no argument", ErrInvalidSpec, s)
		}
		return Spec{Kind: "none"}, nil
	case "file":
		if rest == "" {
			return Spec{}, fmt.Errorf("%w %q: want file:PATH", ErrInvalidSpec, s)
		}
		return Spec{Kind: "file", Path: rest}, nil
	case "etcd":
		var eps []string
		for _, ep := range strings.Split(rest, ",") {
			if !strings.HasPrefix(ep, "https://") && !strings.HasPrefix(ep, "http://") {
				return Spec{}, fmt.Errorf("%w %q: endpoint %q: want https://HOST:PORT", ErrInvalidSpec, s, ep)
			}
			eps = append(eps, ep)
		}
		return Spec{Kind: "etcd", Endpoints: eps}, nil
	}
	return Spec{}, fmt.Errorf("%w %q: want none, file:PATH or etcd:https://HOST:PORT[,...]", ErrInvalidSpec, s)
}

// Expired reports whether the data path refuses r at wall time now, given
// lastSeen (the latest activity known, at least r.LastSeen) and the
// default idle timeout: the rule of bpf.SessionVerdict in wall-clock time.
func (r *Record) Expired(lastSeen int64, defaultIdle time.Duration, now int64) bool {
	if r.Expires != 0 && now >= r.Expires {
		return true
	}
	idle := r.IdleTimeout
	if idle == 0 {
		idle = defaultIdle
	}
	return now-max(lastSeen, r.LastSeen) > int64(idle)
}
