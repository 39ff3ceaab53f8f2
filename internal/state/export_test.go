package state

import (
	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// SetAfterScan installs a hook that runs after each batch a sweep reads and
// before it deletes that batch's expired sessions.
func SetAfterScan(s *Sweeper, fn func()) { s.afterScan = fn }

// SetBeforeDelete installs a hook that runs inside a section, between the
// re-read of an expired session and its delete.
func SetBeforeDelete(s *Sweeper, fn func()) { s.beforeDelete = fn }

// SetLegacySweep makes s sweep with the earlier design: LookupAndDelete of
// each expired session and a put-back of one found live, with fn (if not
// nil) running before the put-back.
func SetLegacySweep(s *Sweeper, beforePutBack func()) {
	s.legacy, s.beforePutBack = true, beforePutBack
}

// GuardStats returns how many session writes through m overlapped a sweep
// section, and how many of those found their value deleted and wrote it
// again.
func GuardStats(m *Maps) (overlaps, repaired uint64) {
	return m.stats.overlaps.Load(), m.stats.repaired.Load()
}

// ReadSweepSeq reads the sweep sequence as a grant does.
func ReadSweepSeq(m *Maps) (uint64, error) { return readSeq(m.SweepSeq) }

// ConfigFromValue decodes a config map value, for the encoding's tests.
func ConfigFromValue(v *bpf.AegisConfigValue) Config { return configFromValue(v) }

// SetBeforeTombDelete installs a hook that runs inside a tombstone section,
// between the re-read of a stale tombstone and its delete.
func SetBeforeTombDelete(s *Sweeper, fn func()) { s.beforeTombDelete = fn }

// RevokedMark is the expires_ns of a session revoked without room for its
// tombstone.
const RevokedMark = revokedMark

// SetUnguardedTombs makes m write tombstones without the sweep sequence
// check, as a design without it would.
func SetUnguardedTombs(m *Maps) { m.unguardedTombs = true }

// PutTomb writes a tombstone as it is, for tests that age one.
func PutTomb(m *Maps, k Key, v bpf.AegisTombValue) error {
	return m.updateTomb(k, &v, ebpf.UpdateAny)
}
