package reaper_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/daemon"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// The reaper exports the data path's counters and map fill from real
// traffic through the real XDP program, the monitor mode from the config
// map, and says when the maps are gone.
func TestExporter(t *testing.T) {
	topo := tu.NewTopology(t)
	e := &env{t: t, ns: topo.Gateway, pin: tu.PinDir(t)}
	load := func(extra ...string) {
		e.loader(append([]string{"load", "-i", tu.PublicIface, "-c", tu.ControllerV4.String(), "--group", "root",
			"--max-sessions", "1000", "--allow", "203.0.113.0/24,tcp/22", "--allow", "2001:db8:ff::/48",
			"--allow", tu.ClientV4.String() + ",udp/7002"}, extra...)...)
	}
	load()
	addr := freeAddr(t)
	_, stop := e.daemon("--cleanup-interval", "1h", "--metrics-address", addr)
	defer stop()
	waitFor(t, "the metrics endpoint", func() bool {
		return metric(scrapeSafe(addr), "aegis_datapath_loaded") == 1
	})

	svc := netip.AddrPortFrom(tu.ServiceAV4, 7000)
	topo.Serve(t, svc)
	const dropped, passed = 3, 2
	for range dropped {
		if err := topo.UDP(tu.ClientV4, svc, 200*time.Millisecond); err == nil {
			t.Fatal("a datagram without a session passed")
		}
	}
	m := e.maps()
	grant(t, m, state.Session{Key: state.Key{Src: tu.ClientV4, Dst: tu.ServiceAV4, Port: 7000, Proto: state.UDP},
		User: "alice", LastSeen: state.Now(), IdleTimeout: time.Hour})
	grant(t, m, state.Session{Key: state.Key{Src: tu.ClientV4, Dst: tu.ServiceAV4, Port: 7001, Proto: state.UDP},
		User: "alice", LastSeen: state.Now() - uint64(2*time.Hour), IdleTimeout: time.Hour})
	for range passed {
		if err := topo.UDP(tu.ClientV4, svc, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	allowed := netip.AddrPortFrom(tu.ServiceAV4, 7002)
	topo.Serve(t, allowed)
	const admitted = 4
	for range admitted {
		if err := topo.UDP(tu.ClientV4, allowed, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	ids, err := state.ReadAllowIDs(m)
	if err != nil {
		t.Fatal(err)
	}
	clientRule, _ := state.ParseAllowRule(tu.ClientV4.String() + ",udp/7002")
	sshRule, _ := state.ParseAllowRule("203.0.113.0/24,tcp/22")
	ruleSeries := func(id uint8) string {
		return fmt.Sprintf(`aegis_datapath_allow_rule_packets_total{family="ipv4",rule_id="%d"}`, id)
	}
	revoked := state.Key{Src: tu.ClientV6, Dst: tu.ServiceAV6, Port: 7000, Proto: state.Any}
	grant(t, m, state.Session{Key: revoked, User: "bob", LastSeen: state.Now(), IdleTimeout: time.Hour})
	if err := m.Revoke(revoked); err != nil {
		t.Fatal(err)
	}

	body := scrape(t, addr)
	// Ethernet, IPv4, UDP and the 4-byte payload.
	const frame = 14 + 20 + 8 + 4
	for series, want := range map[string]float64{
		`aegis_datapath_packets_total{reason="no_session",verdict="drop"}`:                            dropped,
		`aegis_datapath_bytes_total{reason="no_session",verdict="drop"}`:                              dropped * frame,
		`aegis_datapath_packets_total{reason="session",verdict="pass"}`:                               passed,
		`aegis_datapath_bytes_total{reason="session",verdict="pass"}`:                                 passed * frame,
		`aegis_datapath_packets_total{reason="expired",verdict="drop"}`:                               0,
		`aegis_datapath_sessions_active{family="ipv4"}`:                                               1,
		`aegis_datapath_sessions_entries{family="ipv4"}`:                                              2,
		`aegis_datapath_sessions_entries{family="ipv6"}`:                                              0,
		`aegis_datapath_sessions_capacity{family="ipv4"}`:                                             1000,
		`aegis_datapath_sessions_capacity{family="ipv6"}`:                                             1000,
		`aegis_datapath_allow_entries{family="ipv4"}`:                                                 2,
		`aegis_datapath_allow_entries{family="ipv6"}`:                                                 1,
		ruleSeries(ids[clientRule]):                                                                   admitted,
		ruleSeries(ids[sshRule]):                                                                      0,
		ruleSeries(0):                                                                                 0,
		`aegis_datapath_allow_rule_packets_total{family="ipv6",rule_id="0"}`:                          0,
		`aegis_datapath_tombstones_entries{family="ipv4"}`:                                            0,
		`aegis_datapath_tombstones_entries{family="ipv6"}`:                                            1,
		`aegis_datapath_tombstones_active{family="ipv6"}`:                                             1,
		`aegis_datapath_tombstones_capacity{family="ipv6"}`:                                           1000, // --max-sessions
		`aegis_datapath_monitor_mode`:                                                                 0,
		`aegis_datapath_port_marks_trusted{kind="flows"}`:                                             1, // the loader's
		`aegis_datapath_port_marks_trusted{kind="sessions"}`:                                          0, // no control plane ran
		`aegis_datapath_loaded`:                                                                       1,
		fmt.Sprintf(`aegis_build_info{program_tag=%q,version=%q}`, daemon.ProgramTag(), cliVersion()): 1,
	} {
		if got := metric(body, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if c := metric(body, `aegis_datapath_allow_capacity{family="ipv4"}`); c <= 0 {
		t.Errorf("allow capacity %v", c)
	}
	if n := strings.Count(body, "\naegis_datapath_allow_rule_packets_total{"); n != 5 {
		t.Errorf("%d allow rule series, want one per rule and one per family for the rules without a counter", n)
	}
	if n := strings.Count(body, "\naegis_datapath_packets_total{"); n != len(state.Reasons) {
		t.Errorf("%d packet series, want one per reason (%d)", n, len(state.Reasons))
	}

	// The loader turns monitor mode on: the next scrape says so.
	load("--monitor")
	if got := metric(scrape(t, addr), "aegis_datapath_monitor_mode"); got != 1 {
		t.Errorf("monitor mode after load --monitor: %v", got)
	}

	// Unloaded: the reaper says the maps are gone and exports no stale
	// data-path series.
	e.loader("unload")
	waitFor(t, "aegis_datapath_loaded 0", func() bool { return metric(scrapeSafe(addr), "aegis_datapath_loaded") == 0 })
	if body := scrape(t, addr); strings.Contains(body, "aegis_datapath_packets_total") {
		t.Error("packet counters exported with no maps")
	}
}

// The build's program tag is the tag the kernel gives the loaded program.
func TestProgramTagMatchesKernel(t *testing.T) {
	e := newEnv(t)
	tag := pinnedTag(t, e.pin)
	if got := daemon.ProgramTag(); got != tag {
		t.Fatalf("aegis_build_info program_tag %s, kernel's tag of the loaded build %s", got, tag)
	}
}
