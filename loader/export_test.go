package loader

// SetEventBuffers sets a watcher's event queue and netlink receive buffer,
// so that a test can overrun them.
func SetEventBuffers(w *Watcher, queue, rcvbuf int) { w.queue, w.rcvbuf = queue, rcvbuf }

// ParseProcAddr is parseProcAddr, for the table test of /proc/net/tcp.
var ParseProcAddr = parseProcAddr

// Handshake is handshake, for the test of confirm.
var Handshake = handshake
