package state

// SetAfterScan installs a hook that runs after each batch a sweep reads and
// before it deletes that batch's expired sessions.
func SetAfterScan(s *Sweeper, fn func()) { s.afterScan = fn }
