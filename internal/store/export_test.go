package store

// Test access to the codecs.
var (
	EncodeActivityEntry = appendActivity
	DecodeActivity      = decodeActivity
	SessionPath         = sessionPath
	ParseSessionPath    = parseSessionPath
)

// ActivityVersion is the first byte of an activity value.
const ActivityVersion = activityVersion

// SetSnapshotPage sets how many keys a snapshot reads per request, so
// that a test can span pages without a hundred thousand sessions.
func SetSnapshotPage(n int64) (restore func()) {
	old := snapshotPage
	snapshotPage = n
	return func() { snapshotPage = old }
}

// SetSnapshotReads sets how many requests of a snapshot are in flight.
func SetSnapshotReads(n int) (restore func()) {
	old := snapshotReads
	snapshotReads = n
	return func() { snapshotReads = old }
}

// SetSnapshotRevHook calls fn with each snapshot's revision before the
// snapshot reads at it.
func SetSnapshotRevHook(fn func(rev int64)) (restore func()) {
	snapshotRevHook = fn
	return func() { snapshotRevHook = nil }
}
