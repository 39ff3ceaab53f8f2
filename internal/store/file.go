package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/aegis-agent/aegis/internal/state"
)

// File is a store in a bbolt database file for one gateway: its sessions
// survive a reboot. One process opens the file at a time (bbolt holds a
// lock on it); that is the control plane, and only it writes. Its
// revision is a counter in the file, and Watch delivers this process's own
// writes, so the control plane applies them to the maps exactly as it
// applies a fleet's from etcd.
//
// A write is durable when it returns: bbolt commits with fsync.
type File struct {
	db *bolt.DB

	mu   sync.Mutex
	subs map[*fileSub]struct{}
}

var (
	bucketSessions = []byte("sessions")
	bucketMeta     = []byte("meta")
	keyRevision    = []byte("revision")
)

// fileSubBacklog is how many batches a watcher may fall behind before it
// is told to resynchronise (ErrCompacted).
const fileSubBacklog = 4096

type fileSub struct {
	ch     chan Batch
	closed bool
}

// OpenFile opens or creates the store at path (mode 0600).
func OpenFile(path string) (*File, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: %w: another process holds it", path, err)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketSessions, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return &File{db: db, subs: make(map[*fileSub]struct{})}, nil
}

func revisionOf(tx *bolt.Tx) int64 {
	b := tx.Bucket(bucketMeta).Get(keyRevision)
	if len(b) != 8 {
		return 0
	}
	return int64(beUint64(b))
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

func beBytes(v uint64) []byte {
	b := make([]byte, 8)
	for i := 7; i >= 0; i-- {
		b[i] = byte(v)
		v >>= 8
	}
	return b
}

// Snapshot implements Store.
func (f *File) Snapshot(ctx context.Context) (Snapshot, error) {
	var snap Snapshot
	err := f.db.View(func(tx *bolt.Tx) error {
		snap.Rev = revisionOf(tx)
		return tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			key, err := parseSessionPath(string(k))
			if err != nil {
				return err
			}
			r, mod, err := decodeRecord(key, v)
			if err != nil {
				return err
			}
			snap.Entries = append(snap.Entries, Entry{Record: r, ModRev: mod})
			return nil
		})
	})
	if err != nil {
		return Snapshot{}, fmt.Errorf("read store: %w", err)
	}
	return snap, nil
}

// Watch implements Store: it delivers the writes of this process.
func (f *File) Watch(ctx context.Context, rev int64) <-chan Batch {
	sub := &fileSub{ch: make(chan Batch, fileSubBacklog)}
	f.mu.Lock()
	var current int64
	_ = f.db.View(func(tx *bolt.Tx) error { current = revisionOf(tx); return nil })
	if current > rev {
		// Writes between the caller's snapshot and now are not kept.
		sub.ch <- Batch{Err: ErrCompacted}
		close(sub.ch)
		f.mu.Unlock()
		return sub.ch
	}
	f.subs[sub] = struct{}{}
	f.mu.Unlock()
	go func() {
		<-ctx.Done()
		f.mu.Lock()
		f.drop(sub, ctx.Err())
		f.mu.Unlock()
	}()
	return sub.ch
}

// drop ends sub with err; call with f.mu held.
func (f *File) drop(sub *fileSub, err error) {
	if sub.closed {
		return
	}
	sub.closed = true
	delete(f.subs, sub)
	select {
	case sub.ch <- Batch{Err: err}:
	default:
	}
	close(sub.ch)
}

// errNothing rolls back a transaction that changed nothing, so that the
// revision counts changes only, as etcd's does.
var errNothing = errors.New("nothing changed")

// Txn implements Store.
func (f *File) Txn(ctx context.Context, ops []Op) (int64, error) {
	if len(ops) > MaxTxnOps {
		return 0, fmt.Errorf("write sessions: %d ops, at most %d", len(ops), MaxTxnOps)
	}
	// Held across the commit, so that watchers get batches in revision
	// order.
	f.mu.Lock()
	defer f.mu.Unlock()
	var rev int64
	var events []Event
	err := f.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSessions)
		rev = revisionOf(tx) + 1
		events = events[:0]
		for i := range ops {
			op := &ops[i]
			k := []byte(sessionPath(op.Record.Key))
			old := b.Get(k)
			if op.IfModRev >= 0 {
				var mod int64
				if old != nil {
					if _, m, err := decodeRecord(op.Record.Key, old); err == nil {
						mod = m
					} else {
						mod = -2
					}
				}
				if mod != op.IfModRev {
					return ErrConflict
				}
			}
			if op.Delete {
				if old == nil {
					continue
				}
				if err := b.Delete(k); err != nil {
					return err
				}
				events = append(events, Event{Type: Delete, Entry: Entry{Record: Record{Key: op.Record.Key}, ModRev: rev}})
				continue
			}
			if err := b.Put(k, encodeRecord(&op.Record, rev)); err != nil {
				return err
			}
			events = append(events, Event{Type: Put, Entry: Entry{Record: op.Record, ModRev: rev}})
		}
		if len(events) == 0 {
			return errNothing
		}
		return tx.Bucket(bucketMeta).Put(keyRevision, beBytes(uint64(rev)))
	})
	if errors.Is(err, errNothing) {
		return 0, nil
	}
	if err != nil {
		if errors.Is(err, ErrConflict) {
			return rev - 1, err
		}
		return 0, fmt.Errorf("write sessions: %w", err)
	}
	batch := Batch{Events: events, Rev: rev}
	for sub := range f.subs {
		select {
		case sub.ch <- batch:
		default:
			f.drop(sub, ErrCompacted)
		}
	}
	return rev, nil
}

// PublishActivity implements Store: it raises the stored last-seen time
// of each session, so that a reboot restores how idle it really was (to
// within one --activity-interval). It is not a session change: no
// revision, no event.
func (f *File) PublishActivity(ctx context.Context, _, all []Activity) error {
	if len(all) == 0 {
		return nil
	}
	err := f.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSessions)
		for i := range all {
			a := &all[i]
			k := []byte(sessionPath(a.Key))
			old := b.Get(k)
			if old == nil {
				continue
			}
			r, mod, err := decodeRecord(a.Key, old)
			if err != nil || r.LastSeen >= a.LastSeen {
				continue
			}
			r.LastSeen = a.LastSeen
			if err := b.Put(k, encodeRecord(&r, mod)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("write activity: %w", err)
	}
	return nil
}

// SetApplied implements Store: no other gateway waits.
func (f *File) SetApplied(int64) {}

// WaitApplied implements Store: there is no other gateway.
func (f *File) WaitApplied(context.Context, int64) []string { return nil }

// Probe implements Store.
func (f *File) Probe(context.Context) error { return nil }

// Shared implements Store.
func (f *File) Shared() bool { return false }

// Close implements Store.
func (f *File) Close() error {
	f.mu.Lock()
	for sub := range f.subs {
		f.drop(sub, errors.New("store closed"))
	}
	f.mu.Unlock()
	return f.db.Close()
}

// ShiftTimes moves every stored time of the store at path by d, as if the
// wall clock had run d further while the gateway was down: a reboot of d
// for the tests, and an operator's repair of a clock that jumped. The
// store must not be open.
func ShiftTimes(path string, d time.Duration) error {
	f, err := OpenFile(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSessions)
		type kv struct{ k, v []byte }
		var out []kv
		err := b.ForEach(func(k, v []byte) error {
			key, err := parseSessionPath(string(k))
			if err != nil {
				return err
			}
			r, mod, err := decodeRecord(key, v)
			if err != nil {
				return err
			}
			r.Created -= int64(d)
			r.LastSeen -= int64(d)
			if r.Expires != 0 {
				r.Expires -= int64(d)
			}
			out = append(out, kv{append([]byte(nil), k...), encodeRecord(&r, mod)})
			return nil
		})
		if err != nil {
			return err
		}
		for _, e := range out {
			if err := b.Put(e.k, e.v); err != nil {
				return err
			}
		}
		return nil
	})
}

var _ Store = (*File)(nil)
var _ = state.Key{}
