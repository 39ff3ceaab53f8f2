package e2e

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// kill -9 of the real aegis-reaper at random points of its deleting
// sections, while grants re-grant the near-expiry sessions it is deleting:
// after each kill every acknowledged grant is in the map.
//
// Each round grants every key expired, starts the reaper, and stops it
// (SIGSTOP) at a random point once its first section is open: often
// after it re-read some of those sessions and before it deleted them.
// Then it grants every key live, each grant in its own goroutine, lets the
// reaper run on for a random moment, and kills it: the reaper deletes the
// sessions it had re-read expired, now re-granted, and often dies with the
// section open. The grants that overlapped the section wait for its lock
// (released by the kernel when the reaper dies) and write their value
// again. Without that repair the test loses grants.
func TestReaperKilledDuringGrants(t *testing.T) {
	const kills, keys = 100, 256
	g := loadedPins(t, "--group", "root")
	m := g.maps()
	seq := func() uint64 {
		var v bpf.AegisSweepSeqValue
		if err := m.SweepSeq.LookupWithFlags(uint32(0), &v, ebpf.LookupLock); err != nil {
			panic(err) // also called off the test's goroutine
		}
		return v.Seq
	}
	ks := make([]state.Key, keys)
	for i := range ks {
		ks[i] = state.Key{Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.AddrFrom4([4]byte{198, 51, 100, 10}),
			Port: 443, Proto: state.TCP}
	}
	// spin waits about d without leaving the CPU, for the sub-millisecond
	// waits a sleep cannot time.
	spin := func(d time.Duration) {
		for start := time.Now(); time.Since(start) < d; {
		}
	}

	inSection, stoppedInSection, acked := 0, 0, 0
	deadline := time.Now().Add(3 * time.Minute)
	for kill := range kills {
		if time.Now().After(deadline) {
			t.Fatalf("only %d kills within the time allowed", kill)
		}
		for _, k := range ks {
			if err := m.Grant(state.Session{Key: k, User: "stale", LastSeen: state.Now() - uint64(time.Hour), IdleTimeout: time.Second}); err != nil {
				t.Fatal(err)
			}
		}
		// Hold the sweep lock until the reaper waits for it at its first
		// section, then let it go and stop the reaper a moment later.
		hold, err := state.LockDir(state.SweepLockPath(g.pin), false)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin("aegis-reaper"), "--pin-path", g.pin, "--cleanup-interval", "1ms", "--log-level", "error")
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waitLockWaiter(t, state.SweepLockPath(g.pin), func() string { return out.String() })
		// A section opens after base (at base+1, or base+2 when base is
		// odd: the reaper first closes the one the last kill left open).
		// Watch for it, then stop the reaper a random moment into it.
		base := seq()
		hold.Unlock()
		for start := time.Now(); time.Since(start) < 100*time.Millisecond; {
			if at := seq(); at > base && at%2 == 1 || at > base+2 {
				break
			}
		}
		spin(time.Duration(rand.Int64N(int64(300 * time.Microsecond))))
		if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(cmd.Process.Pid, &ws, syscall.WUNTRACED, nil); err != nil || !ws.Stopped() {
			t.Fatalf("kill %d: wait for the stopped reaper: %v, status %v\n%s", kill, err, ws, out.String())
		}
		if at := seq(); at%2 == 1 && at > base {
			stoppedInSection++
		}

		user := fmt.Sprintf("round%d", kill)
		errs := make([]error, keys)
		var wg sync.WaitGroup
		for i, k := range ks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = m.Grant(state.Session{Key: k, User: user, LastSeen: state.Now(), IdleTimeout: time.Hour})
			}()
		}
		// Let the grants write (those that overlap the open section then
		// wait for its lock), then the reaper delete a little more.
		time.Sleep(20 * time.Millisecond)
		if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		spin(time.Duration(rand.Int64N(int64(100 * time.Microsecond))))
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if seq()%2 == 1 {
			inSection++
		}
		wg.Wait()

		for i, k := range ks {
			if errs[i] != nil {
				t.Fatalf("kill %d: grant %v: %v", kill, k, errs[i])
			}
			acked++
			if s, err := m.Lookup(k); err != nil || s.User != user {
				t.Fatalf("after kill %d: acknowledged grant %s of %v: found %q, %v", kill, user, k, s.User, err)
			}
		}
	}
	t.Logf("%d kills, %d of them with a deleting section open (%d stopped in one); %d acknowledged grants, none lost",
		kills, inSection, stoppedInSection, acked)
	if stoppedInSection < kills/10 || inSection < kills/20 {
		t.Fatalf("only %d of %d kills landed inside a deleting section (%d stops)", inSection, kills, stoppedInSection)
	}
}

// waitLockWaiter waits until a process waits for an exclusive flock on
// dir, as /proc/locks shows it ("->" marks a blocked request).
func waitLockWaiter(t *testing.T, dir string, log func() string) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	ino := fmt.Sprintf(":%d ", st.Ino)
	deadline := time.Now().Add(10 * time.Second)
	for {
		locks, err := os.ReadFile("/proc/locks")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(locks), "\n") {
			if strings.Contains(l, "->") && strings.Contains(l, "FLOCK") && strings.Contains(l, "WRITE") && strings.Contains(l, ino) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("aegis-reaper did not wait for the sweep lock within 10s\n%s", log())
		}
		time.Sleep(time.Millisecond)
	}
}
