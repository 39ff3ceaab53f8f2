package controlplane

// SetAfterClaim installs a hook that runs between a grant's check of who
// holds the session and its write.
func SetAfterClaim(s *Server, fn func()) { s.afterClaim = fn }

// PendingDecodeErrors is how many decode failures the codec noted and no
// guard took yet.
func PendingDecodeErrors(s *Server) int64 { return s.codec.pending.Load() }
