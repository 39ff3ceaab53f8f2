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
