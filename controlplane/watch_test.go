package controlplane_test

import (
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// dataPath loads the XDP program on the env's pinned maps with drop
// events on, and returns a function that runs a TCP frame through it.
func (e *env) dataPath() func(src netip.Addr, port uint16) {
	t := e.t
	t.Helper()
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	m := e.maps()
	var objs bpf.AegisObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: m.ByName()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	cfg := state.Config{DefaultIdleTimeout: time.Minute, GRPCPort: 50001, EventDropRate: 1000}
	v, err := cfg.Value()
	if err != nil {
		t.Fatal(err)
	}
	// The daemons' handle is read-only on the config; the loader writes it.
	config, err := ebpf.LoadPinnedMap(state.MapPath(e.pin, state.MapConfig), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer config.Close()
	if err := config.Put(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return func(src netip.Addr, port uint16) {
		f := tu.Frame{Src: src, Dst: netip.MustParseAddr("198.51.100.10"), Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: port}
		if _, err := objs.AegisXdp.Run(&ebpf.RunOptions{Data: f.Bytes()}); err != nil {
			t.Fatal(err)
		}
	}
}

// A filtered watcher over mutual TLS sees the drop it asked for, with its
// tuple and reason, and not the one it filtered out; --last answers from
// the history and ends when asked not to follow.
func TestWatchVerdicts(t *testing.T) {
	e := newEnv(t, envOptions{})
	knock := e.dataPath()
	agent, _ := e.controller()
	c := ctx(t)
	stream, err := agent.WatchVerdicts(c, &agentv1.WatchVerdictsRequest{
		Verdict: "drop", SourceCidr: "203.0.113.0/24", Port: 22, Protocol: 6,
		// Since a minute ago: an event published before the server
		// registered this watcher comes from the history instead.
		Since: timestamppb.New(time.Now().Add(-time.Minute)),
	})
	if err != nil {
		t.Fatal(err)
	}
	knock(netip.MustParseAddr("192.0.2.9"), 22)   // another source
	knock(netip.MustParseAddr("203.0.113.9"), 23) // another port
	knock(netip.MustParseAddr("203.0.113.9"), 22)
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	ev := resp.GetEvent()
	if ev.GetSource() != "203.0.113.9" || ev.GetDestination() != "198.51.100.10" || ev.GetSourcePort() != 40000 ||
		ev.GetDestinationPort() != 22 || ev.GetProtocol() != 6 || ev.GetReason() != "no_session" ||
		ev.GetCause() != "no_session" || ev.GetVerdict() != "drop" || ev.GetAction() != "drop" || resp.GetLost() != 0 {
		t.Fatalf("event %v", resp)
	}
	if d := time.Since(ev.GetTime().AsTime()); d < -time.Second || d > 10*time.Second {
		t.Fatalf("event time %v, %v ago", ev.GetTime().AsTime(), d)
	}

	last, err := agent.WatchVerdicts(c, &agentv1.WatchVerdictsRequest{Last: 2, NoFollow: true})
	if err != nil {
		t.Fatal(err)
	}
	var got []uint32
	for {
		r, err := last.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, r.GetEvent().GetDestinationPort())
	}
	if len(got) != 2 || got[0] != 23 || got[1] != 22 {
		t.Fatalf("last 2: ports %v, want [23 22]", got)
	}
}

func TestWatchVerdictsRefusals(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.dataPath()
	agent, _ := e.controller()
	c := ctx(t)
	for _, req := range []*agentv1.WatchVerdictsRequest{
		{Verdict: "maybe"}, {Reasons: []string{"nonsense"}}, {SourceCidr: "300.1.1.1/8"}, {Port: 70000}, {Protocol: 256},
	} {
		s, err := agent.WatchVerdicts(c, req)
		if err == nil {
			_, err = s.Recv()
		}
		if code(err) != codes.InvalidArgument {
			t.Errorf("%v: %v, want InvalidArgument", req, err)
		}
	}
	// The watchers are capped; the one past the cap is told so.
	for i := 0; ; i++ {
		s, err := agent.WatchVerdicts(c, &agentv1.WatchVerdictsRequest{Last: 1})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { _, err := s.Recv(); done <- err }()
		select {
		case err := <-done:
			if code(err) != codes.ResourceExhausted {
				t.Fatalf("watcher %d: %v", i, err)
			}
			if i < 2 {
				t.Fatalf("refused at watcher %d", i)
			}
			return
		case <-time.After(300 * time.Millisecond): // admitted, nothing to send
		}
		if i > 100 {
			t.Fatal("no cap on watchers")
		}
	}
}
