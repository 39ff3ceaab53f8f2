package e2e

import (
	"bufio"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// ctlArgs are aegisctl's connection flags as the controller, with its
// certificate written next to the agent's.
func (p *pkiDir) ctlArgs(t *testing.T) []string {
	t.Helper()
	cli, err := p.ca.IssueClient("controller", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.WriteFiles(p.file("controller.crt"), p.file("controller.key")); err != nil {
		t.Fatal(err)
	}
	return []string{"--address", grpcAddr.String(), "--tls-cert", p.file("controller.crt"),
		"--tls-key", p.file("controller.key"), "--tls-ca", p.file("ca.crt")}
}

// observe runs "aegisctl observe --json" in the gateway namespace and
// delivers its events.
func observe(t *testing.T, g *gateway, conn []string, args ...string) <-chan aegisctl.ObservedEvent {
	t.Helper()
	cmd := g.Gateway.Command(bin("aegisctl"), append(append([]string{"observe", "--json"}, args...), conn...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &tu.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("aegisctl observe stderr:\n%s", stderr.String())
		}
	})
	ch := make(chan aegisctl.ObservedEvent, 1024)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var e aegisctl.ObservedEvent
			if json.Unmarshal(sc.Bytes(), &e) == nil {
				ch <- e
			}
		}
		io.Copy(io.Discard, out)
	}()
	return ch
}

func nextEvent(t *testing.T, ch <-chan aegisctl.ObservedEvent, within time.Duration, match func(aegisctl.ObservedEvent) bool) aegisctl.ObservedEvent {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case e, ok := <-ch:
			if !ok {
				t.Fatal("aegisctl observe ended")
			}
			if match(e) {
				return e
			}
		case <-deadline:
			t.Fatalf("no matching event within %v", within)
		}
	}
}

// A client knocking without a session shows up in "aegisctl observe" with
// its tuple and reason within a second, and "aegisctl top" names it; a
// flood from many sources emits at most the configured rate, and every
// dropped frame of it is emitted, suppressed or lost. The control plane
// runs as an unprivileged user with CAP_BPF only: the ring buffer's pin
// must let it read.
func TestObserveEndToEnd(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	conn := p.ctlArgs(t)
	if fi, err := os.Stat(filepath.Join(g.pin, "events")); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("events pin: %v %v, want mode 0660", fi.Mode(), err)
	}

	events := observe(t, g, conn, "--from", tu.ClientV4.String(), "--since", "1m")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	g.Serve(t, svc)
	g.expectBlocked("TCP without a session", bpf.ReasonNoSession, func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) })
	e := nextEvent(t, events, time.Second, func(aegisctl.ObservedEvent) bool { return true })
	if e.Source != tu.ClientV4.String() || e.Destination != tu.ServiceAV4.String() || e.DestPort != 8080 ||
		e.SourcePort == 0 || e.Protocol != "tcp" || e.Reason != "no_session" || e.Verdict != "drop" || e.Action != "drop" ||
		e.Interface != "pub0" {
		t.Fatalf("event %+v", e)
	}

	var top aegisctl.Top
	cmd := g.Gateway.Command(bin("aegisctl"), append([]string{"top", "--json"}, conn...)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("aegisctl top: %v", err)
	}
	if err := json.Unmarshal(out, &top); err != nil {
		t.Fatal(err)
	}
	// The client's drop is named; the namespace's own IPv6 multicast
	// listener reports, dropped too, may rank beside it.
	named := func(rows []aegisctl.TopRow, key string) bool {
		return slices.ContainsFunc(rows, func(r aegisctl.TopRow) bool { return r.Key == key && r.Events >= 1 })
	}
	if !named(top.Sources, tu.ClientV4.String()) || !named(top.Destinations, tu.ServiceAV4.String()) || !named(top.Ports, "8080/tcp") {
		t.Fatalf("top: %s", out)
	}

	// The flood: 100,000 SYNs from 65,536 sources, straight onto the wire.
	m := g.maps()
	limits := func() (s bpf.AegisEventLimit) {
		var per []bpf.AegisEventLimit
		if err := m.EventLimits.Lookup(uint32(bpf.EventKindDrop), &per); err != nil {
			t.Fatal(err)
		}
		for _, l := range per {
			s.Emitted += l.Emitted
			s.Suppressed += l.Suppressed
			s.Lost += l.Lost
		}
		return s
	}
	before, statsBefore := limits(), g.stats()
	link := g.Client.OpenLink(t, "cli0")
	gwMAC := mac(t, g.Gateway, "pub0")
	const flood = 100_000
	start := time.Now()
	for i := range flood {
		src := netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
		if i%2 == 1 {
			src = netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 8)})
		}
		f := tu.Frame{Src: src, Dst: tu.ServiceAV4, Proto: tu.ProtoTCP, SrcPort: uint16(1024 + i%60000), DstPort: 8080}
		link.Send(t, gwMAC, f.Bytes()[14:])
	}
	time.Sleep(200 * time.Millisecond) // the last frames through XDP
	elapsed := time.Since(start)
	after, statsAfter := limits(), g.stats()
	dropped := statsAfter[bpf.ReasonNoSession].Packets - statsBefore[bpf.ReasonNoSession].Packets
	accounted := (after.Emitted - before.Emitted) + (after.Suppressed - before.Suppressed) + (after.Lost - before.Lost)
	if dropped < flood || accounted != dropped {
		t.Fatalf("%d frames sent, %d dropped as no_session, %d emitted + suppressed + lost", flood, dropped, accounted)
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	emitted := after.Emitted - before.Emitted
	bound := uint64(float64(cpus) * 100 * (1 + elapsed.Seconds()))
	if emitted > bound {
		t.Fatalf("flood of %v emitted %d events, more than %d (%d CPUs at the default 100/s)", elapsed, emitted, bound, cpus)
	}
	t.Logf("flood: %d frames in %v: %d emitted, %d suppressed, %d lost", dropped, elapsed, emitted,
		after.Suppressed-before.Suppressed, after.Lost-before.Lost)
}

// Monitor mode: the would-be drop passes, and its event says what
// enforcement would have done.
func TestObserveMonitorMode(t *testing.T) {
	g := newDaemonGateway(t, "--monitor")
	p := newPKI(t)
	startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	events := observe(t, g, p.ctlArgs(t), "--since", "1m", "--reason", "monitor")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	g.Serve(t, svc)
	g.expectPass("TCP without a session in monitor mode", bpf.ReasonMonitor, func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) })
	e := nextEvent(t, events, 2*time.Second, func(e aegisctl.ObservedEvent) bool { return e.Source == tu.ClientV4.String() })
	if e.Reason != "monitor" || e.Cause != "no_session" || e.Verdict != "drop" || e.Action != "pass" || e.DestPort != 8080 {
		t.Fatalf("event %+v", e)
	}
}

// "aegis-loader load --event-drop-rate 0" turns drop events off: a knock
// is dropped and counted, and nothing is emitted or suppressed.
func TestLoaderTurnsDropEventsOff(t *testing.T) {
	g := newGateway(t, "load", "--event-drop-rate", "0")
	svc := netip.AddrPortFrom(tu.ServiceAV4, 8080)
	g.Serve(t, svc)
	g.expectBlocked("TCP without a session", bpf.ReasonNoSession, func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) })
	var per []bpf.AegisEventLimit
	if err := g.maps().EventLimits.Lookup(uint32(bpf.EventKindDrop), &per); err != nil {
		t.Fatal(err)
	}
	for cpu, l := range per {
		if l != (bpf.AegisEventLimit{}) {
			t.Fatalf("CPU %d: %+v with drop events off", cpu, l)
		}
	}
	// Reloading with the default rate turns them back on.
	g.loader("load")
	g.expectBlocked("TCP without a session", bpf.ReasonNoSession, func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) })
	if err := g.maps().EventLimits.Lookup(uint32(bpf.EventKindDrop), &per); err != nil {
		t.Fatal(err)
	}
	var emitted uint64
	for _, l := range per {
		emitted += l.Emitted
	}
	if emitted == 0 {
		t.Fatal("no event after reloading with the default rate")
	}
}

// "aegisctl observe" keeps working across a full unload and a new load:
// the control plane's one events reader moves to the new events map (a
// new kernel object) without ending the watcher's stream, and a knock
// after the load shows up within a couple of seconds.
func TestObserveFollowsFullReload(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	cp := startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	events := observe(t, g, p.ctlArgs(t), "--from", tu.ClientV4.String())
	knock := func(port uint16) {
		t.Helper()
		svc := netip.AddrPortFrom(tu.ServiceAV4, port)
		g.expectBlocked("TCP without a session", bpf.ReasonNoSession, func() error { return g.TCP(tu.ClientV4, svc, probeTimeout) })
		nextEvent(t, events, 2*time.Second, func(e aegisctl.ObservedEvent) bool { return e.DestPort == uint32(port) })
	}
	g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 8080))
	g.Serve(t, netip.AddrPortFrom(tu.ServiceAV4, 8081))
	knock(8080)
	eventsID := func() ebpf.MapID {
		id, err := state.MapIDOf(g.maps().Events)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	before := eventsID()

	g.loader("unload")
	g.loader("load", "--group", strconv.Itoa(daemonGID))
	if after := eventsID(); after == before {
		t.Fatalf("the reload kept events map %d", after)
	}
	knock(8081)
	if !strings.Contains(cp.out.String(), "the verdict watchers now follow the new one") {
		t.Fatalf("the control plane did not log the switch:\n%s", cp.out.String())
	}
}

// The control plane, unprivileged with CAP_BPF only, explains the
// controller's gRPC bypass with the data path's own locality answer (the
// locality program the loader pins), and the data path then does what it
// said with the same packets on the wire: from the controller's address
// to the gateway's own address passes, to a host behind it drops.
func TestExplainControllerBypassMatchesTheWire(t *testing.T) {
	g := newDaemonGateway(t)
	p := newPKI(t)
	startControlPlane(t, g, p, cpOptions{caps: "+bpf"})
	conn := p.ctlArgs(t)
	link := g.Client.OpenLink(t, "cli0")
	gwMAC := mac(t, g.Gateway, "pub0")
	for _, c := range []struct {
		dst    netip.Addr
		reason bpf.Reason
	}{{tu.GatewayPubV4, bpf.ReasonController}, {tu.GatewayPrivV4, bpf.ReasonController}, {tu.ServiceAV4, bpf.ReasonNoSession}} {
		var ex aegisctl.Explanation
		out, err := g.Gateway.Command(bin("aegisctl"), append([]string{"explain", "--json", tu.ControllerV4.String(), c.dst.String(), "50001"}, conn...)...).Output()
		if err != nil {
			t.Fatalf("aegisctl explain: %v", err)
		}
		if err := json.Unmarshal(out, &ex); err != nil {
			t.Fatalf("%s: %v", out, err)
		}
		if ex.Reason != c.reason.String() || strings.Contains(ex.Why, "routing table") {
			t.Fatalf("explain to %v: %+v, want %v from the data path's own lookup", c.dst, ex, c.reason)
		}
		before := g.stats()
		link.Send(t, gwMAC, tu.TCPPacket(netip.AddrPortFrom(tu.ControllerV4, 40000), netip.AddrPortFrom(c.dst, 50001), tu.TCPSyn, 64))
		deadline := time.Now().Add(2 * time.Second)
		for g.stats()[c.reason].Packets == before[c.reason].Packets {
			if time.Now().After(deadline) {
				t.Fatalf("the packet to %v was not counted as %v", c.dst, c.reason)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
