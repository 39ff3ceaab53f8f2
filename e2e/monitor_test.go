package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// The bound on the control plane's memory with 64 MonitorSessions slots,
// as docs/operations.md states it (controlplane.MemoryBound): 64 MiB for
// the process and the walk, the latest snapshot and two per slot, each at
// most 4 MiB.
const monitorMemoryBound = 64<<20 + (2*64+1)*4<<20

// 50 MonitorSessions streams whose client never reads, on a full map of
// 262,144 sessions: the real daemon's memory stays within the stated
// bound, a stream that reads still gets its snapshots, and grants made
// meanwhile succeed.
func TestControlPlaneMonitorMemory(t *testing.T) {
	g := newDaemonGateway(t)
	const capacity = 262144
	tu.FillSessionsV4(t, g.pin, capacity, "bulk", state.Now())
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf", args: []string{"--monitor-interval", "1s",
		"--monitor-max-streams-per-peer", "64", "--monitor-max-streams", "64"}})
	pid := cp.cmd.Process.Pid
	base := rssOf(t, pid)

	var peak atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if r, err := procStatus(pid, "VmRSS:"); err == nil && r > peak.Load() {
				peak.Store(r)
			}
			select {
			case <-stopSampling:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// 50 streams over 5 connections, none ever read.
	var conns []*grpc.ClientConn
	for range 5 {
		conns = append(conns, cp.dial(p.controller))
	}
	for i := range 50 {
		if _, err := session.NewSessionManagerClient(conns[i%5]).MonitorSessions(ctx, &session.Empty{}); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
	// One stream that reads.
	reader, err := session.NewSessionManagerClient(cp.dial(p.controller)).MonitorSessions(ctx, &session.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	var snapshots atomic.Int64
	readErr := make(chan error, 1)
	go func() {
		for {
			l, err := reader.Recv()
			if err != nil {
				readErr <- err
				return
			}
			if len(l.GetSessions()) == 0 {
				readErr <- fmt.Errorf("empty snapshot of a full map")
				return
			}
			snapshots.Add(1)
		}
	}()

	// Grants meanwhile: new IPv6 sessions, and refreshes of IPv4 ones
	// (the IPv4 map is full) by their own user, since another user's
	// grant would be refused as a takeover.
	agent := agentv1.NewAgentServiceClient(cp.dial(p.controller))
	var wg sync.WaitGroup
	var grants atomic.Int64
	grantErr := make(chan error, 4)
	end := time.Now().Add(12 * time.Second)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(end); i++ {
				req := &agentv1.LoginEventRequest{User: "alice", SrcIp: fmt.Sprintf("2001:db8:1::%x", w<<12|i&0xfff+1),
					DstIp: tu.ServiceAV6.String(), DstPort: 443}
				if i%2 == 1 {
					k := tu.FillKeyV4(w<<14 | i&0x3fff)
					req.User, req.SrcIp, req.DstIp, req.DstPort = "bulk", netip.AddrFrom4(k.Src).String(), netip.AddrFrom4(k.Dst).String(), uint32(k.Dport)
				}
				c, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := agent.LoginEvent(c, req)
				cancel()
				if err != nil {
					grantErr <- fmt.Errorf("LoginEvent %d of worker %d: %w", i, w, err)
					return
				}
				grants.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stopSampling)
	<-sampled
	select {
	case err := <-grantErr:
		t.Fatal(err)
	case err := <-readErr:
		t.Fatalf("reading stream: %v", err)
	default:
	}
	// One snapshot a second or so for 12 s, the first at once.
	if n := snapshots.Load(); n < 6 {
		t.Fatalf("the reading stream got %d snapshots in 12 s at a 1 s interval", n)
	}
	hwm := hwmOf(t, pid)
	t.Logf("RSS %.1f MiB at start, peak %.1f MiB sampled, %.1f MiB high-water mark; bound %.0f MiB; %d grants, %d snapshots read",
		mib(base), mib(peak.Load()), mib(hwm), mib(monitorMemoryBound), grants.Load(), snapshots.Load())
	if hwm > monitorMemoryBound {
		t.Fatalf("control plane's peak RSS %.1f MiB is over the stated bound %.0f MiB", mib(hwm), mib(monitorMemoryBound))
	}
	if !strings.Contains(cp.out.String(), "MonitorSessions stream dropped") {
		t.Fatal("no stream that does not read was dropped")
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func rssOf(t *testing.T, pid int) int64 { return mustProcStatus(t, pid, "VmRSS:") }

func hwmOf(t *testing.T, pid int) int64 { return mustProcStatus(t, pid, "VmHWM:") }

func mustProcStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	v, err := procStatus(pid, field)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// procStatus returns a "kB" field of /proc/PID/status in bytes.
func procStatus(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
