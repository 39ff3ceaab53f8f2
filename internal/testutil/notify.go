package testutil

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// NotifySocket stands in for systemd's notification socket: give a daemon
// NOTIFY_SOCKET=Path and read what it reports (READY=1, WATCHDOG=1, ...).
// Messages are read in order through a cursor: Expect consumes them.
type NotifySocket struct {
	Path string

	mu   sync.Mutex
	cond *sync.Cond
	msgs []string // one entry per line
	next int
}

// NewNotifySocket listens on a fresh datagram socket in dir that any user
// may send to (daemons under test run unprivileged).
func NewNotifySocket(t testing.TB, dir string) *NotifySocket {
	t.Helper()
	n := &NotifySocket{Path: filepath.Join(dir, RandomName("notify-")+".sock")}
	n.cond = sync.NewCond(&n.mu)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.Path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := os.Chmod(n.Path, 0o666); err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, strings.Split(strings.TrimSpace(string(buf[:k])), "\n")...)
			n.cond.Broadcast()
			n.mu.Unlock()
		}
	}()
	return n
}

// Expect consumes messages until one contains want and returns it; it
// fails t if none arrives within timeout.
func (n *NotifySocket) Expect(t testing.TB, want string, timeout time.Duration) string {
	t.Helper()
	timer := time.AfterFunc(timeout, func() { n.mu.Lock(); n.cond.Broadcast(); n.mu.Unlock() })
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	n.mu.Lock()
	defer n.mu.Unlock()
	for {
		for ; n.next < len(n.msgs); n.next++ {
			if m := n.msgs[n.next]; strings.Contains(m, want) {
				n.next++
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q notification within %v; got %q", want, timeout, n.msgs)
		}
		n.cond.Wait()
	}
}

// Drain consumes every message received so far.
func (n *NotifySocket) Drain() {
	n.mu.Lock()
	n.next = len(n.msgs)
	n.mu.Unlock()
}

// ExpectNone fails t if a message containing want arrives within d.
func (n *NotifySocket) ExpectNone(t testing.TB, want string, d time.Duration) {
	t.Helper()
	time.Sleep(d)
	n.mu.Lock()
	defer n.mu.Unlock()
	for ; n.next < len(n.msgs); n.next++ {
		if strings.Contains(n.msgs[n.next], want) {
			t.Fatalf("unexpected %q notification: %q", want, n.msgs[n.next])
		}
	}
}
