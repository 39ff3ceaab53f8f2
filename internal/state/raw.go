package state

import (
	"errors"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the walks that readers of the whole map run often (the
// control plane's snapshots and pages): they decode neither the user nor
// the addresses into netip values, so that a walk of a full map allocates
// nothing per session.

// EachV4 calls fn with every entry of sessions_v4, in the map's order, until
// fn returns false. The key and value are only valid during the call.
// Concurrent writes behave as in Sessions.
func (m *Maps) EachV4(fn func(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) bool) error {
	return eachEntry(m.SessionsV4, fn)
}

// EachV6 is EachV4 for sessions_v6.
func (m *Maps) EachV6(fn func(k *bpf.AegisSessionKeyV6, v *bpf.AegisSessionValue) bool) error {
	return eachEntry(m.SessionsV6, fn)
}

func eachEntry[K any](mp *ebpf.Map, fn func(k *K, v *bpf.AegisSessionValue) bool) error {
	err := eachBatch(mp, make([]K, batchSize), make([]bpf.AegisSessionValue, batchSize),
		func(keys []K, vals []bpf.AegisSessionValue) bool {
			for i := range keys {
				if !fn(&keys[i], &vals[i]) {
					return false
				}
			}
			return true
		})
	if errors.Is(err, errStopped) {
		return nil
	}
	return err
}

// ValueTimeLeft is Session.TimeLeft of a raw value, and whether the data
// path passes it at now: the rule of Session.Verdict and Session.TimeLeft,
// without decoding the session.
func ValueTimeLeft(v *bpf.AegisSessionValue, defaultIdle time.Duration, now uint64) (left time.Duration, pass bool) {
	if r, _ := bpf.SessionVerdict(v, uint64(defaultIdle), now); r != bpf.ReasonSession {
		return 0, false
	}
	s := Session{LastSeen: v.LastSeenNs, Expires: v.ExpiresNs, IdleTimeout: time.Duration(v.IdleTimeoutNs)}
	return s.TimeLeft(defaultIdle, now), true
}

// SessionOf4 decodes one raw entry of sessions_v4.
func SessionOf4(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) Session {
	return sessionFrom(keyFromV4(k), v)
}

// SessionAt decodes a raw sessions value stored under k.
func SessionAt(k Key, v *bpf.AegisSessionValue) Session { return sessionFrom(k, v) }

// SessionOf6 decodes one raw entry of sessions_v6.
func SessionOf6(k *bpf.AegisSessionKeyV6, v *bpf.AegisSessionValue) Session {
	return sessionFrom(keyFromV6(k), v)
}

// UserIs reports whether a raw value's user is user, without decoding it.
func UserIs(v *bpf.AegisSessionValue, user string) bool {
	if len(user) >= len(v.User) {
		return false
	}
	for i := 0; i < len(user); i++ {
		if byte(v.User[i]) != user[i] {
			return false
		}
	}
	return v.User[len(user)] == 0
}
