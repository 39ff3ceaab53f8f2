package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unsafe"
)

// This file models the verdict events of aegis.c (see "Verdict events"
// there): which frames emit one, what it says, and the per-CPU token
// bucket that limits them.

// EventKind is the rate limiter bucket an event draws on: the index into
// the event_limits map.
type EventKind uint32

// The kinds, as enum event_kind numbers them.
const (
	EventKindDrop = EventKind(AegisEventKindEVENT_KIND_DROP) // drops and would-be drops
	EventKindPass = EventKind(AegisEventKindEVENT_KIND_PASS)
	EventKinds    = int(AegisEventKindEVENT_KINDS)
)

// EventBurst is EVENT_BURST_NS: a bucket holds at most this much time's
// worth of its rate, so an idle CPU may emit that many events at once.
const EventBurst = time.Duration(AegisLimitsLIMIT_EVENT_BURST_NS)

// eventCost is the credit one event takes, in event-nanoseconds.
const eventCost = uint64(time.Second)

// Admit is event_admit(): it refills the bucket for the time since its
// last use at rate events per second, then takes one event's credit if it
// has it. A refusal changes nothing but Suppressed.
func (l *AegisEventLimit) Admit(rate, now uint64) bool {
	elapsed := int64(now - l.LastNs)
	elapsed = max(0, min(elapsed, int64(EventBurst)))
	credit := min(l.Credit+uint64(elapsed)*rate, rate*uint64(EventBurst))
	if credit < eventCost {
		l.Suppressed++
		return false
	}
	l.Credit, l.LastNs = credit-eventCost, now
	return true
}

// EventKindOf returns the bucket a verdict draws on: a pass that is not a
// would-be drop is a pass; drops and monitor's would-be drops are drops.
func EventKindOf(reason, cause Reason, action Action) EventKind {
	if cause == reason && action == XDPPass {
		return EventKindPass
	}
	return EventKindDrop
}

// EventRate returns the configured rate of a kind, in events per second
// per CPU; 0 emits none.
func EventRate(cfg *AegisConfigValue, k EventKind) uint64 {
	if k == EventKindPass {
		return uint64(cfg.EventPassRate)
	}
	return uint64(cfg.EventDropRate)
}

// event is event_emit().
func (env *Env) event(t *tuple, reason, cause Reason, action Action, n int) {
	k := EventKindOf(reason, cause, action)
	rate := EventRate(&env.Config, k)
	if rate == 0 {
		return
	}
	if mutation == "event-tuple-after-parse" && cause == ReasonMalformed {
		t = &tuple{}
	}
	l := &env.EventLimits[k]
	if !l.Admit(rate, env.Now) {
		return
	}
	l.Emitted++
	env.Events = append(env.Events, AegisEvent{
		TsNs: env.Now, Ifindex: env.Ifindex, Len: uint32(n),
		Src: t.src, Dst: t.dst, Sport: t.sport, Dport: t.dport,
		Proto: t.proto, Family: t.family,
		Reason: uint8(reason), Cause: uint8(cause), Action: uint32(action),
	})
}

// EventSize is the bytes of one event in the ring buffer.
const EventSize = int(unsafe.Sizeof(AegisEvent{}))

// ErrShortEvent is returned by DecodeEvent for a record too short to be an
// event: a reader of another build's ring buffer.
var ErrShortEvent = errors.New("short event record")

// DecodeEvent decodes one ring buffer record.
func DecodeEvent(raw []byte) (AegisEvent, error) {
	var e AegisEvent
	if len(raw) < EventSize {
		return e, fmt.Errorf("decode event: %w: %d bytes, want %d", ErrShortEvent, len(raw), EventSize)
	}
	_, err := binary.Decode(raw, binary.NativeEndian, &e)
	if err != nil {
		return e, fmt.Errorf("decode event: %w", err)
	}
	return e, nil
}

// ParseReason returns the reason of a name as Reason.String spells it.
func ParseReason(name string) (Reason, bool) {
	for r, n := range reasonNames {
		if n == name {
			return r, true
		}
	}
	return 0, false
}
