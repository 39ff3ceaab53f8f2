package controlplane

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/internal/state"
)

// This file is MonitorSessions: one daemon-wide snapshot clock, shared
// pre-encoded snapshots, caps on streams, and the dropping of streams whose
// client does not read.
//
// One goroutine (run) takes the snapshot, while at least one stream is open,
// every --monitor-interval with ±20 % jitter, and encodes it once; every
// stream sends the same bytes (codec.go). The clock runs from the first
// stream's opening, not from each stream's, and its jitter keeps it from
// staying in phase with the controller's own timers.
//
// The controller replaces its view with each snapshot, so a snapshot that
// was taken before one of its writes (a compat grant, revoke or IpChange)
// and arrives after the write's reply undoes that write in its view: after
// an IpChange, the moved service would vanish until the next snapshot. So
// every compat write, once applied and before its reply, bumps a counter;
// a snapshot records the counter before its walk; a stream does not send a
// snapshot whose walk began before the last compat write, and the write
// asks the clock for a new snapshot at once (at most one per
// monitorMinGap). IpChange and the walk also exclude each other (the bulk
// lock), so no snapshot sees half a move. The only exception: a stream that
// has waited a whole interval for a fresh snapshot, because compat writes
// keep coming faster than a walk of the map takes, sends the latest one
// anyway rather than nothing.
//
// Memory: a stream holds no snapshot of its own, only references to shared
// ones: the one its transport is writing and, while that write is blocked by
// HTTP/2 flow control, the next one. A send that has not completed within
// the send timeout drops the stream. gRPC keeps the unsent rest of a
// message queued until the client reads it or the connection closes, so a
// dropped stream keeps its slot under the caps until then: the number of
// snapshots held stays bounded by the caps (docs/operations.md has the
// numbers).

// Defaults of the MonitorSessions options.
const (
	DefaultMonitorStreamsPerPeer = 4
	DefaultMonitorStreams        = 16
	DefaultMonitorMaxMessageSize = 4 << 20 // gRPC's default MaxCallRecvMsgSize
)

// memoryBase is the daemon's memory besides snapshots: the process, gRPC,
// TLS, metrics, and the walk's scratch space (24 bytes per IPv4 session,
// 6 MiB for a full map of the default capacity).
const memoryBase = 64 << 20

// MemoryBound is the most memory the daemon holds with streams
// MonitorSessions slots taken and snapshots of at most maxMessage bytes:
// the base, the latest snapshot, and two per slot (the one its transport
// is writing, the next one waiting for HTTP/2 flow control).
func MemoryBound(streams, maxMessage int) int64 {
	return memoryBase + int64(1+2*streams)*int64(maxMessage)
}

// monitorJitter is the largest relative deviation of one snapshot period.
const monitorJitter = 0.2

// monitorMinGap is the shortest time between two snapshots that writes or
// new streams ask for, so that a burst of writes costs one walk.
func monitorMinGap(interval time.Duration) time.Duration { return min(interval/5, time.Second) }

// period is one interval between scheduled snapshots: interval ± 20 %,
// from r in [0, 1).
func period(interval time.Duration, r float64) time.Duration {
	return time.Duration(float64(interval) * (1 - monitorJitter + 2*monitorJitter*r))
}

// promptly is when to take a snapshot that was asked for at now, given
// the last one was taken at last and the next is due at due (zero: none).
func promptly(now, last, due time.Time, minGap time.Duration) time.Time {
	t := now
	if !last.IsZero() {
		t = later(now, last.Add(minGap))
	}
	if !due.IsZero() && due.Before(t) {
		return due
	}
	return t
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// compatSnapshot is one encoded session.SessionList, shared by every stream
// and never modified.
type compatSnapshot struct {
	data     []byte
	sessions int
	omitted  int       // sessions left out to fit the size limit
	writes   uint64    // compat writes applied before the walk began
	taken    time.Time // when the walk began
	// err, when the maps could not be read, ends the streams with it
	// (Unavailable when the loader has not run), as the controller
	// expects; it reconnects.
	err error
}

type monitor struct {
	s           *Server
	log         zerolog.Logger
	interval    time.Duration
	sendTimeout time.Duration
	maxBytes    int
	perPeerCap  int
	totalCap    int
	rnd         func() float64

	// writes counts the compat writes applied.
	writes atomic.Uint64
	wake   chan struct{} // 1-buffered: a write or a new stream wants a snapshot

	mu      sync.Mutex
	total   int            // slots taken: open streams and dropped ones not yet freed
	perPeer map[string]int // slots by peer identity
	latest  *compatSnapshot
	changed chan struct{} // closed when latest is replaced

	// Owned by run.
	entries   []compatEntry
	truncated bool
	// afterWalk, set by tests, runs between a walk and its publication.
	afterWalk func()
	// sendStale, set by tests, turns off the freshness rule, to show the
	// race it prevents.
	sendStale bool

	snapshots  prometheus.Counter
	failures   prometheus.Counter
	dropped    prometheus.Counter
	refused    *prometheus.CounterVec
	streams    prometheus.GaugeFunc
	zombies    atomic.Int64
	zombieG    prometheus.GaugeFunc
	lastSize   prometheus.Gauge
	lastCount  prometheus.Gauge
	lastOmit   prometheus.Gauge
	walkTime   prometheus.Gauge
	truncTotal prometheus.Counter
}

func newMonitor(s *Server, o *Options) *monitor {
	m := &monitor{
		s: s, log: s.log,
		interval:    o.MonitorInterval,
		sendTimeout: o.MonitorSendTimeout,
		maxBytes:    o.MonitorMaxMessageSize,
		perPeerCap:  o.MonitorStreamsPerPeer,
		totalCap:    o.MonitorStreams,
		rnd:         rand.Float64,
		wake:        make(chan struct{}, 1),
		perPeer:     make(map[string]int),
		changed:     make(chan struct{}),
	}
	m.snapshots = prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_controlplane_monitor_snapshots_total",
		Help: "MonitorSessions snapshots taken (one walk and one encoding, shared by every stream)."})
	m.failures = prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_controlplane_monitor_snapshot_failures_total",
		Help: "MonitorSessions snapshots that could not be taken (the maps unusable)."})
	m.truncTotal = prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_controlplane_monitor_snapshots_truncated_total",
		Help: "MonitorSessions snapshots that left sessions out to stay within --monitor-max-message-size."})
	m.dropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "aegis_controlplane_monitor_streams_dropped_total",
		Help: "MonitorSessions streams closed because their client did not read a snapshot within --monitor-send-timeout."})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "aegis_controlplane_monitor_streams_refused_total",
		Help: "MonitorSessions streams refused with ResourceExhausted, by the cap reached (peer, total)."}, []string{"cap"})
	m.refused.WithLabelValues("peer")
	m.refused.WithLabelValues("total")
	m.streams = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_streams",
		Help: "MonitorSessions slots taken: open streams, and dropped ones whose unsent data gRPC still holds."},
		func() float64 { m.mu.Lock(); defer m.mu.Unlock(); return float64(m.total) })
	m.zombieG = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_streams_draining",
		Help: "Dropped MonitorSessions streams whose unsent data gRPC still holds (until the client reads or disconnects)."},
		func() float64 { return float64(m.zombies.Load()) })
	m.lastSize = prometheus.NewGauge(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_snapshot_bytes",
		Help: "Encoded size of the last MonitorSessions snapshot."})
	m.lastCount = prometheus.NewGauge(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_snapshot_sessions",
		Help: "Sessions in the last MonitorSessions snapshot."})
	m.lastOmit = prometheus.NewGauge(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_snapshot_omitted_sessions",
		Help: "Sessions left out of the last MonitorSessions snapshot to stay within --monitor-max-message-size."})
	m.walkTime = prometheus.NewGauge(prometheus.GaugeOpts{Name: "aegis_controlplane_monitor_snapshot_seconds",
		Help: "Time the last MonitorSessions snapshot took to walk the map and encode."})
	return m
}

func (m *monitor) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.snapshots, m.failures, m.truncTotal, m.dropped, m.refused, m.streams, m.zombieG,
		m.lastSize, m.lastCount, m.lastOmit, m.walkTime}
}

// wrote records a compat write, applied: snapshots whose walk began before
// it are no longer sent, and a new one is taken promptly.
func (m *monitor) wrote() {
	m.writes.Add(1)
	m.poke()
}

func (m *monitor) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *monitor) active() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.total > 0
}

// current returns the latest snapshot (nil before the first) and a channel
// closed when it is replaced.
func (m *monitor) current() (*compatSnapshot, <-chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.latest, m.changed
}

// run is the snapshot clock. It returns when stop is closed.
func (m *monitor) run(stop <-chan struct{}) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	minGap := monitorMinGap(m.interval)
	var last, due time.Time
	for {
		var fire <-chan time.Time
		if !due.IsZero() {
			timer.Reset(time.Until(due))
			fire = timer.C
		}
		select {
		case <-stop:
			timer.Stop()
			return
		case <-m.wake:
			timer.Stop()
			if m.active() {
				due = promptly(time.Now(), last, due, minGap)
			}
			continue
		case <-fire:
		}
		if !m.active() {
			due = time.Time{} // nobody listens: no walks until a stream opens
			continue
		}
		last = time.Now()
		m.take(last)
		due = last.Add(period(m.interval, m.rnd()))
	}
}

// take walks the map, encodes the snapshot and publishes it.
func (m *monitor) take(start time.Time) {
	snap := &compatSnapshot{writes: m.writes.Load(), taken: start}
	// Under the bulk lock's read side: an IpChange (write side) is applied
	// wholly before or wholly after the walk, never half seen.
	m.s.bulk.RLock()
	err := m.s.maps.Do(func(maps *state.Maps) error {
		var err error
		m.entries, err = compatEntries(maps, m.entries, state.Now())
		return err
	})
	m.s.bulk.RUnlock()
	if m.afterWalk != nil {
		m.afterWalk()
	}
	if err != nil {
		m.failures.Inc()
		m.log.Debug().Err(err).Msg("MonitorSessions snapshot failed: the streams end")
		snap.err = statusOf(err)
		m.publish(snap)
		return
	}
	all := len(m.entries)
	snap.data, snap.sessions = encodeCompat(m.entries, m.maxBytes)
	snap.omitted = all - snap.sessions
	m.snapshots.Inc()
	m.lastSize.Set(float64(len(snap.data)))
	m.lastCount.Set(float64(snap.sessions))
	m.lastOmit.Set(float64(snap.omitted))
	m.walkTime.Set(time.Since(start).Seconds())
	if snap.omitted > 0 {
		m.truncTotal.Inc()
	}
	if cut := snap.omitted > 0; cut != m.truncated {
		m.truncated = cut
		if cut {
			m.log.Warn().Int("sessions", all).Int("sent", snap.sessions).Int("omitted", snap.omitted).Int("max_bytes", m.maxBytes).
				Msg("MonitorSessions snapshot too large for one message: sending the most recently active sessions only")
		} else {
			m.log.Info().Int("sessions", all).Msg("MonitorSessions snapshot fits again: sending every session")
		}
	}
	// Shrink the scratch buffer after the map emptied a lot.
	if cap(m.entries) > 1024 && len(m.entries) < cap(m.entries)/4 {
		m.entries = nil
	}
	m.publish(snap)
}

func (m *monitor) publish(snap *compatSnapshot) {
	m.mu.Lock()
	m.latest = snap
	close(m.changed)
	m.changed = make(chan struct{})
	m.mu.Unlock()
}

// acquire takes a slot for a stream of peer, or returns ResourceExhausted.
func (m *monitor) acquire(peer string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.perPeer[peer] >= m.perPeerCap {
		m.refused.WithLabelValues("peer").Inc()
		return status.Errorf(codes.ResourceExhausted,
			"MonitorSessions: client %q has %d streams open (or dropped for not reading, until it reads or reconnects), the most allowed (--monitor-max-streams-per-peer)",
			peer, m.perPeer[peer])
	}
	if m.total >= m.totalCap {
		m.refused.WithLabelValues("total").Inc()
		return status.Errorf(codes.ResourceExhausted,
			"MonitorSessions: %d streams are open (or dropped for not reading), the most allowed (--monitor-max-streams)", m.total)
	}
	m.perPeer[peer]++
	m.total++
	return nil
}

func (m *monitor) release(peer string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.total--
	if m.perPeer[peer]--; m.perPeer[peer] <= 0 {
		delete(m.perPeer, peer)
	}
}

// sendable reports whether a stream that last sent at lastSent may send
// snap now: snap's walk began after the last compat write, or the stream
// has waited a whole interval.
func (m *monitor) sendable(snap *compatSnapshot, lastSent, now time.Time) bool {
	return snap.writes >= m.writes.Load() || now.Sub(lastSent) >= m.interval || m.sendStale
}

// serve runs one MonitorSessions stream.
func (m *monitor) serve(stream grpc.ServerStream) error {
	ctx := stream.Context()
	p := peerOf(ctx)
	name := p.identity()
	if err := m.acquire(name); err != nil {
		var buf [64]byte
		m.log.Warn().Str("peer", name).Bytes("peer_address", p.appendAddr(buf[:0])).Err(err).Msg("MonitorSessions refused")
		return err
	}
	held := true
	defer func() {
		if held {
			m.release(name)
		}
	}()
	// A snapshot older than two intervals is from before the clock went
	// idle, and a failed one may be past: the stream waits for the fresh
	// one it asks for.
	notBefore := time.Now().Add(-2 * m.interval)
	if snap, _ := m.current(); snap == nil || snap.err != nil || snap.taken.Before(notBefore) {
		notBefore = time.Now()
		m.poke()
	}

	holds := &sendHolds{}
	sendDone := make(chan error, 1)
	deadline := time.NewTimer(time.Hour)
	deadline.Stop()
	defer deadline.Stop()
	recheck := time.NewTimer(time.Hour)
	recheck.Stop()
	defer recheck.Stop()
	var sent *compatSnapshot
	inflight := false
	lastSent := time.Now() // a new stream waits at most an interval for a fresh snapshot
	for {
		snap, changed := m.current()
		if snap != nil && snap.err != nil && !snap.taken.Before(notBefore) {
			return snap.err
		}
		if !inflight && snap != nil && snap != sent && !snap.taken.Before(notBefore) {
			now := time.Now()
			if m.sendable(snap, lastSent, now) {
				sent, inflight = snap, true
				deadline.Reset(m.sendTimeout)
				out := &outgoing{snap: snap, holds: holds}
				go func() { sendDone <- stream.SendMsg(out) }()
			} else {
				recheck.Reset(lastSent.Add(m.interval).Sub(now))
			}
		}
		select {
		case <-changed:
		case <-recheck.C:
		case err := <-sendDone:
			inflight = false
			deadline.Stop()
			lastSent = time.Now()
			if err != nil {
				return err
			}
		case <-deadline.C:
			m.dropped.Inc()
			var buf [64]byte
			m.log.Warn().Str("peer", name).Bytes("peer_address", p.appendAddr(buf[:0])).Dur("send_timeout", m.sendTimeout).
				Int("snapshot_bytes", len(sent.data)).Msg("MonitorSessions stream dropped: its client has not read the last snapshot")
			held = false
			m.holdUntilFreed(ctx, name, holds)
			return status.Errorf(codes.ResourceExhausted,
				"MonitorSessions: the client has not read a snapshot within %v (--monitor-send-timeout); stream closed, reopen it and keep reading", m.sendTimeout)
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-m.s.stopping:
			return errShuttingDown
		}
	}
}

// holdUntilFreed keeps a dropped stream's slot until gRPC has let go of
// every snapshot it queued for it: the client read them, or the connection
// closed.
func (m *monitor) holdUntilFreed(ctx context.Context, peer string, h *sendHolds) {
	conn := connOf(ctx)
	freed := h.whenFreed()
	if freed == nil || conn == nil {
		m.release(peer)
		return
	}
	m.zombies.Add(1)
	go func() {
		select {
		case <-freed:
		case <-conn.done:
		}
		m.zombies.Add(-1)
		m.release(peer)
	}()
}

// sendHolds counts the snapshots that gRPC holds for one stream: the
// transport frees each when it has written it or dropped the stream. It is
// the mem.BufferPool of the buffers handed to gRPC, which tells it so.
type sendHolds struct {
	mu    sync.Mutex
	n     int
	freed chan struct{} // closed when n drops to 0, once asked for
}

func (h *sendHolds) hold() {
	h.mu.Lock()
	h.n++
	h.mu.Unlock()
}

// Get is never called for the buffers handed to gRPC; it makes sendHolds a
// mem.BufferPool.
func (h *sendHolds) Get(length int) *[]byte {
	b := make([]byte, length)
	return &b
}

// Put is called once a buffer's last reference is freed.
func (h *sendHolds) Put(*[]byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n--; h.n == 0 && h.freed != nil {
		close(h.freed)
		h.freed = nil
	}
}

// whenFreed returns a channel closed when nothing is held, or nil if
// nothing is held now.
func (h *sendHolds) whenFreed() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == 0 {
		return nil
	}
	h.freed = make(chan struct{})
	return h.freed
}
