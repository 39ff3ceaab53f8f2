package controlplane

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/proto/session"
)

// SetAfterClaim installs a hook that runs between a grant's check of who
// holds the session and its write.
func SetAfterClaim(s *Server, fn func()) { s.afterClaim = fn }

// PendingDecodeErrors is how many decode failures the codec noted and no
// guard took yet.
func PendingDecodeErrors(s *Server) int64 { return s.codec.pending.Load() }

// CompatEntry is a compat list entry, for tests of the encoding.
type CompatEntry struct {
	Src, Dst uint32
	Port     uint16
	Left     int32
	LastSeen uint64
}

// EncodeCompat encodes entries (sorted by key, distinct) as encodeCompat
// does.
func EncodeCompat(entries []CompatEntry, maxBytes int) ([]byte, int) {
	es := make([]compatEntry, len(entries))
	for i, e := range entries {
		es[i] = compatEntry{src: e.Src, dst: e.Dst, port: e.Port, left: e.Left, lastSeen: e.LastSeen}
	}
	return encodeCompat(es, maxBytes)
}

// CompatEntrySize is the encoded size of one entry in the list.
func CompatEntrySize(s *session.Session) int {
	e := compatEntry{src: s.SrcIp, dst: s.DstIp, port: uint16(s.DstPort), left: s.TimeLeft}
	return e.size()
}

// Period and Promptly are the snapshot clock's scheduling rules.
func Period(interval time.Duration, r float64) time.Duration { return period(interval, r) }

func Promptly(now, last, due time.Time, minGap time.Duration) time.Time {
	return promptly(now, last, due, minGap)
}

func MonitorMinGap(interval time.Duration) time.Duration { return monitorMinGap(interval) }

// SetAfterWalk makes the snapshot clock call f between each walk and its
// publication. Set it before the first stream opens.
func SetAfterWalk(s *Server, f func()) { s.mon.afterWalk = f }

// SendStaleSnapshots turns off the rule that a stream sends no snapshot
// older than the last compat write.
func SendStaleSnapshots(s *Server) { s.mon.sendStale = true }

// HandshakeReason is the reason label of a TLS handshake error.
func HandshakeReason(err error) string { return handshakeReason(err) }

// LimitedLog is the rate-limited warn log of refused handshakes.
type LimitedLog = limitedLog

// NewLimitedLog returns a limitedLog on a clock of the test's.
func NewLimitedLog(log zerolog.Logger, n int, period time.Duration, now func() time.Time) *LimitedLog {
	l := newLimitedLog(log, n, period)
	l.now = now
	return l
}

// PublishAndReap runs one activity publication and one reaping of the
// store now, as the activity loop does every --activity-interval.
func PublishAndReap(s *Server) {
	s.sl.publish(context.Background())
	s.sl.reap(context.Background())
}

// SetBeforeReapTxn runs fn between the store reaping's judgment and its
// delete.
func SetBeforeReapTxn(s *Server, fn func()) { s.sl.beforeReapTxn = fn }

// SetReapUnconditional makes the store reaping delete without its
// revision condition.
func SetReapUnconditional(s *Server) { s.sl.reapUnconditional = true }
