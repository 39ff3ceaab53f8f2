package explain

// SkipAnyProtocol breaks the snapshot until the returned function
// restores it.
func SkipAnyProtocol() (restore func()) {
	skipAnyProtocol = true
	return func() { skipAnyProtocol = false }
}
