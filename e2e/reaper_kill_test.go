package e2e

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// kill -9 of the real aegis-reaper at random points of its sweeps, kill
// after kill, while grants keep re-granting sessions the sweeps find
// expired: after each kill every acknowledged grant that nothing has
// replaced since is in the map. A kill inside a deleting section leaves
// the sweep sequence odd; grants that overlapped it write their value
// again once the kernel has released the dead reaper's lock.
func TestReaperKilledDuringGrants(t *testing.T) {
	const kills, granters, perGranter, fillers = 100, 2, 256, 20_000
	g := loadedPins(t, "--group", "root")
	m := g.maps()

	// Expired sessions that the sweeps delete, refilled before each run,
	// so that each run spends its time in deleting sections.
	fill := func() {
		t.Helper()
		keys := make([]bpf.AegisSessionKeyV4, fillers)
		vals := make([]bpf.AegisSessionValue, fillers)
		old := state.Now() - uint64(time.Hour)
		for i := range keys {
			keys[i] = bpf.AegisSessionKeyV4{Src: [4]byte{203, 0, 113, byte(i)}, Dst: [4]byte{198, 51, 100, byte(i >> 8)},
				Dport: uint16(1 + i>>16), Proto: 17}
			vals[i] = bpf.AegisSessionValue{LastSeenNs: old, CreatedNs: old, IdleTimeoutNs: uint64(time.Second)}
		}
		if _, err := m.SessionsV4.BatchUpdate(keys, vals, nil); err != nil {
			t.Fatal(err)
		}
	}
	seq := func() uint64 {
		t.Helper()
		var v bpf.AegisSweepSeqValue
		if err := m.SweepSeq.LookupWithFlags(uint32(0), &v, ebpf.LookupLock); err != nil {
			t.Fatal(err)
		}
		return v.Seq
	}

	// The grant loop: each granter grants its keys expired, then live,
	// round after round. live[k] is the user of k's last acknowledged live
	// grant, "" while an expired grant (which a sweep may delete) is the
	// last. Grants run under pause, read-locked, so that the check sees
	// no grant half done.
	var pause sync.RWMutex
	keys := make([][]state.Key, granters)
	live := make([][]string, granters) // written by its granter, read by the check
	acked := make([]int, granters)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var grantErr error
	var errOnce sync.Once
	for gr := range granters {
		keys[gr], live[gr] = make([]state.Key, perGranter), make([]string, perGranter)
		for i := range keys[gr] {
			keys[gr][i] = state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}),
				Dst: netip.AddrFrom4([4]byte{198, 51, 100, byte(200 + gr)}), Port: 443, Proto: state.TCP}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			grant := func(i int, s state.Session, isLive bool) bool {
				pause.RLock()
				defer pause.RUnlock()
				if !isLive {
					live[gr][i] = ""
				}
				if err := m.Grant(s); err != nil {
					errOnce.Do(func() { grantErr = fmt.Errorf("grant %v: %w", s.Key, err) })
					return false
				}
				if isLive {
					live[gr][i] = s.User
					acked[gr]++
				}
				return true
			}
			for round := 0; ; round++ {
				for i, k := range keys[gr] {
					select {
					case <-stop:
						return
					default:
					}
					if !grant(i, state.Session{Key: k, User: "stale", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second}, false) {
						return
					}
				}
				user := fmt.Sprintf("g%d-r%d", gr, round)
				for i, k := range keys[gr] {
					if !grant(i, state.Session{Key: k, User: user, LastSeen: state.Now(), IdleTimeout: time.Hour}, true) {
						return
					}
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()

	inSection, checked := 0, 0
	deadline := time.Now().Add(3 * time.Minute)
	for kill := range kills {
		if time.Now().After(deadline) {
			t.Fatalf("only %d kills within the time allowed", kill)
		}
		fill()
		before := seq()
		cmd := exec.Command(bin("aegis-reaper"), "--pin-path", g.pin, "--cleanup-interval", "1ms", "--log-level", "error")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Once it has started sweeping, at a random point of the sweeps.
		started := time.Now()
		for seq() == before {
			if time.Since(started) > 10*time.Second {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("kill %d: aegis-reaper did not start a section within 10s", kill)
			}
			time.Sleep(100 * time.Microsecond)
		}
		time.Sleep(time.Duration(rand.Int64N(int64(5 * time.Millisecond))))
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if seq()%2 == 1 {
			inSection++
		}

		pause.Lock()
		for gr := range granters {
			for i, user := range live[gr] {
				if user == "" {
					continue
				}
				checked++
				if s, err := m.Lookup(keys[gr][i]); err != nil || s.User != user {
					pause.Unlock()
					t.Fatalf("after kill %d: acknowledged grant %s of %v: found %q, %v", kill, user, keys[gr][i], s.User, err)
				}
			}
		}
		pause.Unlock()
		if grantErr != nil {
			t.Fatal(grantErr)
		}
	}
	pause.Lock()
	n := 0
	for _, a := range acked {
		n += a
	}
	pause.Unlock()
	t.Logf("%d kills, %d of them inside a deleting section; %d live grants acknowledged, %d checks after kills, none lost",
		kills, inSection, n, checked)
	if inSection == 0 {
		t.Fatal("no kill landed inside a deleting section")
	}
}
