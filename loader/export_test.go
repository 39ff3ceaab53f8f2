package loader

// SetEventBuffers sets a watcher's event queue and netlink receive buffer,
// so that a test can overrun them.
func SetEventBuffers(w *Watcher, queue, rcvbuf int) { w.queue, w.rcvbuf = queue, rcvbuf }
