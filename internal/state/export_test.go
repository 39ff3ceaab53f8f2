package state

// SetAfterScan installs a hook that runs after each batch a sweep reads and
// before it deletes that batch's expired sessions.
func SetAfterScan(s *Sweeper, fn func()) { s.afterScan = fn }

// SetBeforePutBack installs a hook that runs before a sweep puts back a
// session re-granted while it was being deleted.
func SetBeforePutBack(s *Sweeper, fn func()) { s.beforePutBack = fn }
