// Package verdicts turns the data path's verdict events (the `events` ring
// buffer, see bpf/README.md) into a stream operators can watch: one ring
// buffer reader per process, a bounded history for "what happened in the
// last minutes", and a fan-out to any number of watchers, each with its
// own filter and a bounded buffer. A watcher that does not keep up loses
// events, which are counted for it; it never slows the reader, the other
// watchers, or the data path (which counts in `lost` whatever the ring
// buffer has no room for).
package verdicts

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Event is one sampled verdict.
type Event struct {
	// Time is the wall-clock time of the verdict, converted from the data
	// path's clock.
	Time    time.Time
	Ifindex uint32
	// Src and Dst are invalid when the frame was not IP or its IP header
	// did not parse; the ports are zero until the L4 header parsed.
	Src, Dst     netip.Addr
	Sport, Dport uint16
	Proto        uint8
	// Reason is the counted reason (monitor for a would-be drop), Cause
	// the verdict's own: what enforcement does or would do.
	Reason bpf.Reason
	Cause  bpf.Reason
	// Action is what the frame got.
	Action bpf.Action
	Len    uint32
}

// Enforced returns the verdict enforcement gives the frame: "pass" or
// "drop", whether or not monitor mode passed it.
func (e *Event) Enforced() string { return e.Cause.Verdict() }

// FromRaw converts a ring buffer event.
func FromRaw(r *bpf.AegisEvent) Event {
	e := Event{
		Time: state.WallTime(r.TsNs), Ifindex: r.Ifindex, Sport: r.Sport, Dport: r.Dport,
		Proto: r.Proto, Reason: bpf.Reason(r.Reason), Cause: bpf.Reason(r.Cause),
		Action: bpf.Action(r.Action), Len: r.Len,
	}
	switch r.Family {
	case 4:
		e.Src, e.Dst = netip.AddrFrom4([4]byte(r.Src[:4])), netip.AddrFrom4([4]byte(r.Dst[:4]))
	case 6:
		e.Src, e.Dst = netip.AddrFrom16(r.Src), netip.AddrFrom16(r.Dst)
	}
	return e
}

// Filter selects events; its zero value selects all. Every set field must
// match.
type Filter struct {
	// Verdict is "pass" or "drop": what enforcement does (a would-be drop
	// in monitor mode is a drop).
	Verdict string
	// Reasons match the counted reason or the cause.
	Reasons []bpf.Reason
	// Src and Dst are prefixes the addresses must lie in.
	Src, Dst netip.Prefix
	// Port matches the source or the destination port.
	Port uint16
	// Proto is the IP protocol number.
	Proto uint8
}

// ErrInvalidFilter is returned for a filter that can match nothing by
// construction (an unknown verdict).
var ErrInvalidFilter = errors.New("invalid filter")

// Validate reports a filter that is not well formed.
func (f *Filter) Validate() error {
	if f.Verdict != "" && f.Verdict != "pass" && f.Verdict != "drop" {
		return fmt.Errorf("%w: verdict %q: want pass or drop", ErrInvalidFilter, f.Verdict)
	}
	return nil
}

// Match reports whether e passes the filter.
func (f *Filter) Match(e *Event) bool {
	if f.Verdict != "" && e.Enforced() != f.Verdict {
		return false
	}
	if len(f.Reasons) > 0 {
		ok := false
		for _, r := range f.Reasons {
			ok = ok || r == e.Reason || r == e.Cause
		}
		if !ok {
			return false
		}
	}
	if f.Src.IsValid() && !(e.Src.IsValid() && f.Src.Contains(e.Src.Unmap())) {
		return false
	}
	if f.Dst.IsValid() && !(e.Dst.IsValid() && f.Dst.Contains(e.Dst.Unmap())) {
		return false
	}
	if f.Port != 0 && e.Sport != f.Port && e.Dport != f.Port {
		return false
	}
	return f.Proto == 0 || e.Proto == f.Proto
}

// Defaults of Options.
const (
	DefaultHistory  = 10_000
	DefaultBuffer   = 1024
	DefaultWatchers = 16
)

// Options configure a Hub; zero fields take the defaults.
type Options struct {
	// History is how many of the latest events are kept for watchers that
	// ask for the past.
	History int
	// Buffer is each watcher's queue; an event that finds it full is lost
	// to that watcher.
	Buffer int
	// Watchers caps the watchers at once (ErrTooManyWatchers).
	Watchers int
	Log      zerolog.Logger
}

// ErrTooManyWatchers is returned by Watch when Options.Watchers are
// already watching.
var ErrTooManyWatchers = errors.New("too many watchers")

// Hub reads the ring buffer and fans the events out.
//
// A full unload and a new load replace the pinned events map: the old one
// lives on (this reader holds it) but no program writes to it any more.
// Switch moves the hub to the new map. Run drains the old reader first
// (Switch flushes it: a flushed reader returns what the ring holds, then
// ErrFlushed), then reads the new one; the watchers, their filters and the
// history stay as they are.
type Hub struct {
	opts Options

	rdMu    sync.Mutex
	rd      *ringbuf.Reader // what Run reads
	pending *ringbuf.Reader // set by Switch until Run takes it
	source  ebpf.MapID      // of the map rd or, once set, pending reads
	stopped bool

	mu       sync.Mutex
	history  []Event // a ring of opts.History
	next     int     // where the next event goes in history
	full     bool
	watchers map[*Watcher]struct{}
}

// NewHub opens a reader on the events ring buffer. The map must have been
// opened writable: the reader advances the consumer position.
func NewHub(events *ebpf.Map, opts Options) (*Hub, error) {
	if opts.History <= 0 {
		opts.History = DefaultHistory
	}
	if opts.Buffer <= 0 {
		opts.Buffer = DefaultBuffer
	}
	if opts.Watchers <= 0 {
		opts.Watchers = DefaultWatchers
	}
	rd, id, err := openReader(events)
	if err != nil {
		return nil, err
	}
	return &Hub{opts: opts, rd: rd, source: id, history: make([]Event, opts.History), watchers: map[*Watcher]struct{}{}}, nil
}

func openReader(events *ebpf.Map) (*ringbuf.Reader, ebpf.MapID, error) {
	id, err := state.MapIDOf(events)
	if err != nil {
		return nil, 0, err
	}
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return nil, 0, fmt.Errorf("open events reader: %w", err)
	}
	return rd, id, nil
}

// ErrStopped is returned by Switch once Run has returned.
var ErrStopped = errors.New("verdict hub stopped")

// Source returns the id of the events map the hub reads (or is switching
// to).
func (h *Hub) Source() ebpf.MapID {
	h.rdMu.Lock()
	defer h.rdMu.Unlock()
	return h.source
}

// Switch moves the hub to another events map, as it is now pinned. The
// events the old map holds are still delivered; the watchers notice
// nothing but the gap while no program wrote events. Returns ErrStopped
// if the hub has stopped.
func (h *Hub) Switch(events *ebpf.Map) error {
	rd, id, err := openReader(events)
	if err != nil {
		return err
	}
	h.rdMu.Lock()
	defer h.rdMu.Unlock()
	if h.stopped {
		rd.Close()
		return ErrStopped
	}
	if h.pending != nil {
		h.pending.Close() // superseded before Run took it
	}
	h.pending, h.source = rd, id
	if err := h.rd.Flush(); err != nil {
		return fmt.Errorf("flush events reader: %w", err)
	}
	return nil
}

// current returns the reader Run reads next, taking a switched-to one
// once the old one is drained; nil once stopped.
func (h *Hub) current(drained *ringbuf.Reader) *ringbuf.Reader {
	h.rdMu.Lock()
	defer h.rdMu.Unlock()
	if h.stopped {
		return nil
	}
	if drained != nil && h.rd == drained && h.pending != nil {
		h.rd, h.pending = h.pending, nil
		drained.Close()
	}
	return h.rd
}

// Run reads events until ctx is done, then closes the reader and every
// watcher.
func (h *Hub) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		h.rdMu.Lock()
		defer h.rdMu.Unlock()
		h.stopped = true
		h.rd.Close()
		if h.pending != nil {
			h.pending.Close()
		}
	})
	defer stop()
	defer h.closeAll()
	var rec ringbuf.Record
	rd := h.current(nil)
	for rd != nil {
		err := rd.ReadInto(&rec)
		switch {
		case errors.Is(err, ringbuf.ErrFlushed):
			// Switch flushed it: the old ring is empty.
			rd = h.current(rd)
			continue
		case errors.Is(err, ringbuf.ErrClosed), errors.Is(err, os.ErrClosed):
			return nil
		case err != nil:
			return fmt.Errorf("read events: %w", err)
		}
		raw, err := bpf.DecodeEvent(rec.RawSample)
		if err != nil {
			h.opts.Log.Warn().Err(err).Msg("skipped an event")
			continue
		}
		h.publish(FromRaw(&raw))
	}
	return nil
}

func (h *Hub) publish(e Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.history[h.next] = e
	h.next = (h.next + 1) % len(h.history)
	h.full = h.full || h.next == 0
	for w := range h.watchers {
		if !w.filter.Match(&e) {
			continue
		}
		select {
		case w.ch <- e:
		default:
			w.lost++
		}
	}
}

func (h *Hub) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for w := range h.watchers {
		delete(h.watchers, w)
		close(w.ch)
	}
}

// Watcher is one subscription.
type Watcher struct {
	h      *Hub
	filter Filter
	ch     chan Event
	lost   uint64 // under h.mu
}

// C delivers the live events; it is closed when the hub stops or the
// watcher is closed.
func (w *Watcher) C() <-chan Event { return w.ch }

// Lost returns how many matching events found the buffer full.
func (w *Watcher) Lost() uint64 {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	return w.lost
}

// Close ends the subscription.
func (w *Watcher) Close() {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	if _, ok := w.h.watchers[w]; ok {
		delete(w.h.watchers, w)
		close(w.ch)
	}
}

// Watch subscribes with a filter and returns, with the watcher, the
// matching events of the history newer than since (the zero time: all),
// at most the last of them (0: no limit). The backlog and the live stream
// neither overlap nor leave a gap.
func (h *Hub) Watch(f Filter, since time.Time, last int) (*Watcher, []Event, error) {
	if err := f.Validate(); err != nil {
		return nil, nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.watchers) >= h.opts.Watchers {
		return nil, nil, fmt.Errorf("%w: %d already watching", ErrTooManyWatchers, len(h.watchers))
	}
	var backlog []Event
	n, start := h.next, 0
	if h.full {
		n, start = len(h.history), h.next
	}
	for i := range n {
		e := &h.history[(start+i)%len(h.history)]
		if e.Time.After(since) && f.Match(e) {
			backlog = append(backlog, *e)
		}
	}
	if last > 0 && len(backlog) > last {
		backlog = backlog[len(backlog)-last:]
	}
	w := &Watcher{h: h, filter: f, ch: make(chan Event, h.opts.Buffer)}
	h.watchers[w] = struct{}{}
	return w, backlog, nil
}
