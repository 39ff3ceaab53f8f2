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
