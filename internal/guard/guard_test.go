package guard_test

import (
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/guard"
	"github.com/aegis-agent/aegis/internal/testutil"
)

// pair is two namespaces joined by a veth: the sender's "a" (203.0.113.1)
// and the guarded host's "b" (203.0.113.2).
type pair struct {
	sender, host *testutil.Netns
	host1        *testutil.Thread
	ifindexB     int
	rx           *net.UDPConn
}

func newPair(t *testing.T) *pair {
	p := &pair{sender: testutil.NewNetns(t, "gs"), host: testutil.NewNetns(t, "gh")}
	p.sender.Run(t, "ip", "link", "add", "sa", "type", "veth", "peer", "name", "hb", "netns", p.host.Name)
	p.sender.Run(t, "ip", "addr", "add", "203.0.113.1/24", "dev", "sa")
	p.sender.Run(t, "ip", "link", "set", "sa", "up")
	p.host.Run(t, "ip", "addr", "add", "203.0.113.2/24", "dev", "hb")
	p.host.Run(t, "ip", "link", "set", "hb", "up")
	p.host1 = p.host.Thread(t)
	var err error
	p.host1.Do(func() {
		var ifi *net.Interface
		if ifi, err = net.InterfaceByName("hb"); err != nil {
			return
		}
		p.ifindexB = ifi.Index
		p.rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(203, 0, 113, 2), Port: 9})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.rx.Close() })
	return p
}

// passes sends one datagram from the sender and reports whether the host
// received it.
func (p *pair) passes(t *testing.T) bool {
	t.Helper()
	err := p.sender.Do(func() error {
		c, err := net.Dial("udp4", "203.0.113.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("probe"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = p.rx.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	buf := make([]byte, 16)
	_, _, err = p.rx.ReadFromUDP(buf)
	return err == nil
}

func (p *pair) do(t *testing.T, fn func() error) {
	t.Helper()
	var err error
	p.host1.Do(func() { err = fn() })
	if err != nil {
		t.Fatal(err)
	}
}

func (p *pair) read(t *testing.T) (guard.State, bool) {
	t.Helper()
	var s guard.State
	var ok bool
	p.do(t, func() (err error) { s, ok, err = guard.Read(); return err })
	return s, ok
}

func TestGuard(t *testing.T) {
	p := newPair(t)
	if !p.passes(t) {
		t.Fatal("no traffic before any guard: the topology is broken")
	}
	if _, ok := p.read(t); ok {
		t.Fatal("guard table present before Sync")
	}
	p.do(t, guard.Remove) // no table: not an error

	// Install: b configured, no device filtered: dropped.
	want := guard.State{Configured: []string{"eth9", "hb"}}
	for range 2 { // idempotent
		p.do(t, func() error { return guard.Sync(want) })
	}
	got, ok := p.read(t)
	if !ok || !slices.Equal(got.Configured, want.Configured) || len(got.Filtered) != 0 {
		t.Fatalf("guard = %+v (present %v), want %+v", got, ok, want)
	}
	if !got.Drops("hb", p.ifindexB) || got.Drops("a", 5) {
		t.Fatalf("Drops wrong for %+v", got)
	}
	if p.passes(t) {
		t.Fatal("a datagram passed the guard of b")
	}
	rules := p.host.Run(t, "nft", "list", "table", "inet", guard.TableName)
	if n := strings.Count(rules, " drop"); n != 1 {
		t.Fatalf("want exactly one drop rule after two syncs, got %d:\n%s", n, rules)
	}

	// Filtered: b's ifindex exempt, traffic passes; the other name stays.
	p.do(t, func() error {
		return guard.Sync(guard.State{Configured: want.Configured, Filtered: []int{p.ifindexB}})
	})
	if !p.passes(t) {
		t.Fatal("a datagram to the filtered b was dropped")
	}
	got, _ = p.read(t)
	if got.Drops("hb", p.ifindexB) || !got.Drops("eth9", 0) || !got.Drops("hb", p.ifindexB+1) {
		t.Fatalf("Drops wrong for %+v", got)
	}

	// Remove one: b no longer configured (operator-detached).
	p.do(t, func() error { return guard.Sync(guard.State{Configured: []string{"eth9"}}) })
	if !p.passes(t) {
		t.Fatal("a datagram to the unconfigured b was dropped")
	}
	got, _ = p.read(t)
	if !slices.Equal(got.Configured, []string{"eth9"}) {
		t.Fatalf("configured = %v, want [eth9]", got.Configured)
	}

	// Remove all, twice.
	p.do(t, func() error { return guard.Sync(want) })
	p.do(t, guard.Remove)
	p.do(t, guard.Remove)
	if _, ok := p.read(t); ok {
		t.Fatal("guard table present after Remove")
	}
	if !p.passes(t) {
		t.Fatal("traffic dropped after Remove")
	}
}

func TestGuardRejectsBadName(t *testing.T) {
	p := newPair(t)
	var err error
	p.host1.Do(func() { err = guard.Sync(guard.State{Configured: []string{"an-interface-name-too-long"}}) })
	if err == nil {
		t.Fatal("Sync accepted a name longer than IFNAMSIZ")
	}
	if _, ok := p.read(t); ok {
		t.Fatal("a rejected Sync created the table")
	}
}
