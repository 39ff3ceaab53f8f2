package loader

import "testing"

// SetEventBuffers sets a watcher's event queue and netlink receive buffer,
// so that a test can overrun them.
func SetEventBuffers(w *Watcher, queue, rcvbuf int) { w.queue, w.rcvbuf = queue, rcvbuf }

// ParseProcAddr is parseProcAddr, for the table test of /proc/net/tcp.
var ParseProcAddr = parseProcAddr

// Handshake is handshake, for the test of confirm.
var Handshake = handshake

// AddRecordMigration registers, for the test's duration, a migration of the
// named map from layout version from that converts its entries with
// convert: a synthetic layout change, for testing the framework before a
// real one needs it.
func AddRecordMigration(t testing.TB, from uint32, name string, convert func(k, v []byte) ([]byte, []byte, bool, error)) {
	addMigration(t, migrationKey{from, name}, records(convert))
}

// AddCounterMigration registers, for the test's duration, the counters
// migration for the named map from layout version from.
func AddCounterMigration(t testing.TB, from uint32, name string) {
	addMigration(t, migrationKey{from, name}, counters)
}

func addMigration(t testing.TB, k migrationKey, m migration) {
	old, had := migrations[k]
	migrations[k] = m
	t.Cleanup(func() {
		if had {
			migrations[k] = old
		} else {
			delete(migrations, k)
		}
	})
}

// CheckPinnedMap is checkPinnedMap, for the test of layouts whose padding
// took a name.
var CheckPinnedMap = checkPinnedMap
