package store

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Etcd is a store that a fleet of gateways shares: every gateway writes
// its grants and revokes there and applies everyone's to its own maps.
// It uses only the v3 API of etcd 3.4: ranges, transactions with
// mod-revision compares, watches and leases.
//
// Each gateway also keeps a key on a lease under gateways/<id> that says
// up to which revision it applied the store to its maps; a write waits
// (WaitApplied) until every other gateway with such a key reached the
// write's revision. A gateway that stops, or is cut off from etcd for
// longer than the lease's TTL, loses its key and is no longer waited for.
type Etcd struct {
	cli    *clientv3.Client
	prefix string
	id     string
	ttl    time.Duration
	log    zerolog.Logger
	seed   maphash.Seed
	sized  func(int) // EtcdOptions.SnapshotSize

	applied chan int64 // latest SetApplied, depth one

	mu      sync.Mutex
	peers   map[string]int64 // other live gateways' applied revisions
	changed chan struct{}    // closed and replaced when peers change

	actMu  sync.Mutex
	shards []uint64 // hash of each activity shard as last written

	stop context.CancelFunc
	done sync.WaitGroup
}

// EtcdOptions configure an Etcd store.
type EtcdOptions struct {
	Endpoints []string
	// TLS is the client's mutual TLS; nil for plaintext (tests on
	// loopback only).
	TLS *tls.Config
	// Prefix is prepended to every key ("/aegis/").
	Prefix string
	// Gateway is this gateway's name.
	Gateway string
	// LeaseTTL is how long a gateway that stopped answering is still
	// waited for; 0 for DefaultLeaseTTL.
	LeaseTTL time.Duration
	Log      zerolog.Logger
	// SnapshotSize, when not nil, is called with the number of sessions a
	// snapshot is about to read, before it reads them (the daemon makes
	// room for them in its memory limit).
	SnapshotSize func(sessions int)
}

// DefaultLeaseTTL is the gateway key's lease TTL.
const DefaultLeaseTTL = 10 * time.Second

// requestTimeout bounds one request to etcd, so that a partition turns
// into ErrUnavailable rather than a hung grant.
const requestTimeout = 3 * time.Second

// MaxActivityShard is the most bytes of one activity value: far below
// etcd's default request limit of 1.5 MiB.
const MaxActivityShard = 768 << 10

// TLSConfig loads the client side of mutual TLS to etcd.
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load store client certificate: %w", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read store CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("read store CA %s: no certificate in it", caFile)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// OpenEtcd connects to etcd. It does not wait for it: a gateway starts
// (fail static) while etcd is unreachable, and Probe says when it is.
func OpenEtcd(o EtcdOptions) (*Etcd, error) {
	if o.Gateway == "" || strings.Contains(o.Gateway, "/") {
		return nil, fmt.Errorf("%w: gateway id %q: want a name without '/'", ErrInvalidSpec, o.Gateway)
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = DefaultLeaseTTL
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            o.Endpoints,
		TLS:                  o.TLS,
		DialTimeout:          requestTimeout,
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Logger:               zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Etcd{cli: cli, prefix: o.Prefix, id: o.Gateway, ttl: o.LeaseTTL, log: o.Log, seed: maphash.MakeSeed(), sized: o.SnapshotSize,
		applied: make(chan int64, 1), peers: map[string]int64{}, changed: make(chan struct{}), stop: cancel}
	e.done.Add(2)
	go e.liveness(ctx)
	go e.watchPeers(ctx)
	return e, nil
}

func unavailable(op string, err error) error {
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, err)
}

// Snapshot implements Store. The sessions are read as several ranges
// in parallel (etcdsnapshot.go), the activity in pages, all at one
// revision, so that a million sessions are never one response.
// A revision compacted while the snapshot reads is read again at a newer
// one, a few times.
func (e *Etcd) Snapshot(ctx context.Context) (Snapshot, error) {
	for try := 1; ; try++ {
		snap, err := e.snapshot(ctx)
		if err == nil || !errors.Is(err, ErrCompacted) || try == snapshotTries {
			return snap, err
		}
		e.log.Info().Err(err).Msg("snapshot revision compacted meanwhile: reading again")
	}
}

// snapshotTries is how often Snapshot reads when its revision is
// compacted under it.
const snapshotTries = 3

func (e *Etcd) snapshot(ctx context.Context) (Snapshot, error) {
	var snap Snapshot
	var err error
	snap.Entries, snap.Rev, err = e.sessionsSnapshot(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	err = e.rangeAll(ctx, e.prefix+activityDir, snap.Rev, func(k, v []byte, _, _ int64) error {
		gw, ok := e.activityGateway(string(k))
		if !ok || gw == e.id {
			return nil
		}
		acts, err := decodeActivity(v)
		if err != nil {
			e.log.Warn().Err(err).Str("gateway", gw).Msg("skipping malformed activity")
			return nil
		}
		snap.Activity = append(snap.Activity, acts...)
		return nil
	}, nil)
	return snap, err
}

// snapshotPage is the most keys one range request of a snapshot reads,
// about 15 MB: a snapshot reads ranges of at most this many keys (in
// pages if a range cannot be split smaller), and the activity in pages of
// it. etcd 3.4 answers a limited range by walking the whole rest of the
// range in its index, so pages of one large range cost pages × remaining
// keys; at 20,000 keys a page a million sessions read at 70,000 a second,
// at 100,000 at 128,000.
var snapshotPage int64 = 100000

// rangeAll reads every key under prefix at revision rev (0: now, which it
// stores in *gotRev), a page at a time. The next page is fetched while fn
// decodes the last one, so that etcd's work and ours overlap.
func (e *Etcd) rangeAll(ctx context.Context, prefix string, rev int64, fn func(k, v []byte, mod, rev int64) error, gotRev *int64) error {
	type page struct {
		resp *clientv3.GetResponse
		err  error
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pages := make(chan page, 1)
	go func() {
		defer close(pages)
		end := clientv3.GetPrefixRangeEnd(prefix)
		key, at := prefix, rev
		for {
			opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(snapshotPage)}
			if at != 0 {
				opts = append(opts, clientv3.WithRev(at))
			}
			rctx, rcancel := context.WithTimeout(ctx, requestTimeout)
			resp, err := e.cli.Get(rctx, key, opts...)
			rcancel()
			select {
			case pages <- page{resp, err}:
			case <-ctx.Done():
				return
			}
			if err != nil || !resp.More || len(resp.Kvs) == 0 {
				return
			}
			if at == 0 {
				at = resp.Header.Revision
			}
			key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	}()
	for p := range pages {
		if p.err != nil {
			if errors.Is(p.err, rpctypes.ErrCompacted) {
				return fmt.Errorf("read store: %w", ErrCompacted)
			}
			return unavailable("read store", p.err)
		}
		if rev == 0 {
			rev = p.resp.Header.Revision
			if gotRev != nil {
				*gotRev = rev
			}
		}
		for _, kv := range p.resp.Kvs {
			if err := fn(kv.Key, kv.Value, kv.ModRevision, rev); err != nil {
				return err
			}
		}
	}
	return nil
}

func (e *Etcd) activityGateway(key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, e.prefix+activityDir)
	if !ok {
		return "", false
	}
	gw, _, ok := strings.Cut(rest, "/")
	return gw, ok
}

// Watch implements Store. It watches the whole prefix, so that the
// revision it reports follows every write of the fleet, and requires a
// leader: a member cut off from its quorum ends the watch instead of
// serving a stale one.
func (e *Etcd) Watch(ctx context.Context, rev int64) <-chan Batch {
	out := make(chan Batch, 16)
	go func() {
		defer close(out)
		// The last batch is sent only if someone still reads.
		fail := func(err error) {
			select {
			case out <- Batch{Err: err}:
			case <-ctx.Done():
			}
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		defer cancel()
		wch := e.cli.Watch(wctx, e.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
		for resp := range wch {
			if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
				fail(ErrCompacted)
				return
			}
			if err := resp.Err(); err != nil {
				fail(unavailable("watch store", err))
				return
			}
			if resp.Canceled {
				fail(unavailable("watch store", errors.New("watch canceled")))
				return
			}
			// Only a progress notification's header says that every change
			// up to it was delivered; the watch's first response carries
			// the store's revision while older events may still follow.
			var b Batch
			switch n := len(resp.Events); {
			case n > 0:
				b.Rev = resp.Events[n-1].Kv.ModRevision
			case resp.IsProgressNotify():
				b.Rev = resp.Header.Revision
			default:
				continue
			}
			for _, ev := range resp.Events {
				if x, ok := e.event(ev); ok {
					b.Events = append(b.Events, x)
				}
			}
			select {
			case out <- b:
			case <-ctx.Done():
				return
			}
		}
		if ctx.Err() == nil {
			fail(unavailable("watch store", errors.New("watch ended")))
		}
	}()
	return out
}

func (e *Etcd) event(ev *clientv3.Event) (Event, bool) {
	key := strings.TrimPrefix(string(ev.Kv.Key), e.prefix)
	switch {
	case strings.HasPrefix(key, sessionsDir):
		k, err := parseSessionPath(key)
		if err != nil {
			e.log.Warn().Err(err).Msg("skipping a malformed session in the store")
			return Event{}, false
		}
		if ev.Type == clientv3.EventTypeDelete {
			return Event{Type: Delete, Entry: Entry{Record: Record{Key: k}, ModRev: ev.Kv.ModRevision}}, true
		}
		r, _, err := decodeRecord(k, ev.Kv.Value)
		if err != nil {
			e.log.Warn().Err(err).Msg("skipping a malformed session in the store")
			return Event{}, false
		}
		return Event{Type: Put, Entry: Entry{Record: r, ModRev: ev.Kv.ModRevision}}, true
	case strings.HasPrefix(key, activityDir) && ev.Type == clientv3.EventTypePut:
		gw, ok := e.activityGateway(string(ev.Kv.Key))
		if !ok || gw == e.id {
			return Event{}, false
		}
		acts, err := decodeActivity(ev.Kv.Value)
		if err != nil {
			e.log.Warn().Err(err).Str("gateway", gw).Msg("skipping malformed activity")
			return Event{}, false
		}
		return Event{Type: ActivityEvent, Gateway: gw, Activity: acts}, true
	}
	return Event{}, false
}

// Txn implements Store.
func (e *Etcd) Txn(ctx context.Context, ops []Op) (int64, error) {
	if len(ops) > MaxTxnOps {
		return 0, fmt.Errorf("write sessions: %d ops, at most %d", len(ops), MaxTxnOps)
	}
	var cmps []clientv3.Cmp
	var puts []clientv3.Op
	for i := range ops {
		op := &ops[i]
		k := e.prefix + sessionPath(op.Record.Key)
		if op.IfModRev >= 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", op.IfModRev))
		}
		if op.Delete {
			puts = append(puts, clientv3.OpDelete(k))
		} else {
			puts = append(puts, clientv3.OpPut(k, string(encodeRecord(&op.Record, 0))))
		}
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := e.cli.Txn(rctx).If(cmps...).Then(puts...).Commit()
	if err != nil {
		return 0, unavailable("write sessions", err)
	}
	if !resp.Succeeded {
		return resp.Header.Revision, ErrConflict
	}
	changed := false
	for _, r := range resp.Responses {
		if d := r.GetResponseDeleteRange(); d != nil && d.Deleted == 0 {
			continue
		}
		changed = true
	}
	if !changed {
		return 0, nil
	}
	return resp.Header.Revision, nil
}

// PublishActivity implements Store. The activity is hashed by key into a
// power-of-two number of shards, each at most MaxActivityShard bytes, and
// only the shards whose content changed since the last call are written:
// one request each.
func (e *Etcd) PublishActivity(ctx context.Context, all, _ []Activity) error {
	size := 1
	for _, a := range all {
		size += entrySize(a.Key)
	}
	n := 1
	for size/n > MaxActivityShard*3/4 {
		n *= 2
	}
	parts := make([][][]byte, n)
	for i := range all {
		a := &all[i]
		s := int(maphash.Comparable(e.seed, a.Key) % uint64(n))
		parts[s] = append(parts[s], appendActivity(nil, a))
	}
	e.actMu.Lock()
	defer e.actMu.Unlock()
	if e.shards == nil {
		// The first publication of this process: shards an earlier run
		// wrote beyond n would otherwise stay.
		if err := e.dropShardsFrom(ctx, n); err != nil {
			return err
		}
		e.shards = []uint64{}
	}
	for s, part := range parts {
		slices.SortFunc(part, bytes.Compare)
		v := append(make([]byte, 0, 1+len(part)*entrySize4), activityVersion)
		for _, p := range part {
			v = append(v, p...)
		}
		h := maphash.Bytes(e.seed, v)
		if s < len(e.shards) && e.shards[s] == h {
			continue
		}
		if err := e.put(ctx, e.activityKey(s), string(v)); err != nil {
			return err
		}
		if s >= len(e.shards) {
			e.shards = append(e.shards, make([]uint64, s+1-len(e.shards))...)
		}
		e.shards[s] = h
	}
	for s := n; s < len(e.shards); s++ {
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		_, err := e.cli.Delete(rctx, e.activityKey(s))
		cancel()
		if err != nil {
			return unavailable("write activity", err)
		}
	}
	e.shards = e.shards[:n]
	return nil
}

// dropShardsFrom deletes this gateway's activity shards numbered n and
// up.
func (e *Etcd) dropShardsFrom(ctx context.Context, n int) error {
	dir := e.prefix + activityDir + e.id + "/"
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := e.cli.Get(rctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return unavailable("read activity", err)
	}
	for _, kv := range resp.Kvs {
		if s, err := strconv.Atoi(strings.TrimPrefix(string(kv.Key), dir)); err == nil && s >= n {
			if _, err := e.cli.Delete(rctx, string(kv.Key)); err != nil {
				return unavailable("write activity", err)
			}
		}
	}
	return nil
}

func (e *Etcd) activityKey(shard int) string {
	return e.prefix + activityDir + e.id + "/" + strconv.Itoa(shard)
}

func (e *Etcd) put(ctx context.Context, k, v string, opts ...clientv3.OpOption) error {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if _, err := e.cli.Put(rctx, k, v, opts...); err != nil {
		return unavailable("write "+strings.TrimPrefix(k, e.prefix), err)
	}
	return nil
}

// SetApplied implements Store: the gateway key is rewritten with rev,
// coalescing calls that come faster than etcd answers.
func (e *Etcd) SetApplied(rev int64) {
	for {
		select {
		case e.applied <- rev:
			return
		default:
		}
		select {
		case old := <-e.applied:
			rev = max(rev, old)
		default:
		}
	}
}

// liveness keeps this gateway's key on a lease, with its applied
// revision, for as long as etcd answers, and takes a new lease when it
// lost one (after a partition longer than the TTL).
func (e *Etcd) liveness(ctx context.Context) {
	defer e.done.Done()
	key := e.prefix + gatewaysDir + e.id
	var applied int64
	for ctx.Err() == nil {
		gctx, cancel := context.WithTimeout(ctx, requestTimeout)
		lease, err := e.cli.Grant(gctx, int64(e.ttl/time.Second))
		cancel()
		if err != nil {
			sleep(ctx, time.Second)
			continue
		}
		write := func() error {
			v, _ := json.Marshal(gatewayValue{Applied: applied})
			return e.put(ctx, key, string(v), clientv3.WithLease(lease.ID))
		}
		if applied == 0 {
			// Not a live gateway before its first apply: nobody waits for it.
			select {
			case applied = <-e.applied:
			case <-ctx.Done():
				return
			}
		}
		if write() != nil {
			sleep(ctx, time.Second)
			continue
		}
		kctx, kcancel := context.WithCancel(ctx)
		ka, err := e.cli.KeepAlive(kctx, lease.ID)
		if err != nil {
			kcancel()
			continue
		}
	loop:
		for {
			select {
			case _, ok := <-ka:
				if !ok {
					break loop
				}
			case rev := <-e.applied:
				applied = max(applied, rev)
				if write() != nil {
					break loop
				}
			case <-ctx.Done():
				break loop
			}
		}
		kcancel()
		if ctx.Err() != nil {
			// A clean stop: let the others stop waiting for this gateway now.
			rctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, _ = e.cli.Revoke(rctx, lease.ID)
			cancel()
		}
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// watchPeers follows the other gateways' keys.
func (e *Etcd) watchPeers(ctx context.Context) {
	defer e.done.Done()
	dir := e.prefix + gatewaysDir
	for ctx.Err() == nil {
		peers := map[string]int64{}
		var rev int64
		err := e.rangeAll(ctx, dir, 0, func(k, v []byte, _, _ int64) error {
			peers[strings.TrimPrefix(string(k), dir)] = appliedOf(v)
			return nil
		}, &rev)
		if err != nil {
			sleep(ctx, time.Second)
			continue
		}
		e.setPeers(func(m map[string]int64) { clear(m); maps(m, peers) })
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range e.cli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
			if resp.Err() != nil || resp.Canceled {
				break
			}
			e.setPeers(func(m map[string]int64) {
				for _, ev := range resp.Events {
					id := strings.TrimPrefix(string(ev.Kv.Key), dir)
					if ev.Type == clientv3.EventTypeDelete {
						delete(m, id)
					} else {
						m[id] = appliedOf(ev.Kv.Value)
					}
				}
			})
		}
		cancel()
		sleep(ctx, 100*time.Millisecond)
	}
}

func maps(dst, src map[string]int64) {
	for k, v := range src {
		dst[k] = v
	}
}

func appliedOf(v []byte) int64 {
	var g gatewayValue
	_ = json.Unmarshal(v, &g)
	return g.Applied
}

func (e *Etcd) setPeers(fn func(map[string]int64)) {
	e.mu.Lock()
	fn(e.peers)
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

// WaitApplied implements Store.
func (e *Etcd) WaitApplied(ctx context.Context, rev int64) []string {
	for {
		e.mu.Lock()
		var lagging []string
		for id, applied := range e.peers {
			if id != e.id && applied < rev {
				lagging = append(lagging, id)
			}
		}
		ch := e.changed
		e.mu.Unlock()
		if len(lagging) == 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			slices.Sort(lagging)
			return lagging
		}
	}
}

// Peers returns the other live gateways and their applied revisions.
func (e *Etcd) Peers() map[string]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int64, len(e.peers))
	for id, r := range e.peers {
		if id != e.id {
			out[id] = r
		}
	}
	return out
}

// Probe implements Store: a linearizable read, which needs the quorum.
func (e *Etcd) Probe(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if _, err := e.cli.Get(rctx, e.prefix+gatewaysDir+e.id); err != nil {
		return unavailable("probe store", err)
	}
	return nil
}

// Shared implements Store.
func (e *Etcd) Shared() bool { return true }

// Close implements Store: the gateway's key is released, so that no
// other gateway waits for it.
func (e *Etcd) Close() error {
	e.stop()
	e.done.Wait()
	return e.cli.Close()
}

var _ Store = (*Etcd)(nil)
