package aegisctl_test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/internal/explain"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// admitThroughRules installs allow rules in the pinned maps as the loader
// would and runs the real XDP program over them on packets that the
// rules admit: twice from 203.0.113.9 to TCP 443, once from 2001:db8::9
// to TCP 22.
func admitThroughRules(t *testing.T, pin string) {
	t.Helper()
	e, err := state.CompileAllow(tu.AllowRules(t, "203.0.113.0/24,tcp/443", "198.51.100.0/24", "2001:db8::/32,tcp/22"))
	if err != nil {
		t.Fatal(err)
	}
	m := &state.Maps{}
	for _, name := range state.MapNames {
		mp, err := ebpf.LoadPinnedMap(state.MapPath(pin, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		m.Set(name, mp)
	}
	defer m.Close()
	for k, v := range e.V4 {
		if err := m.AllowV4.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range e.V6 {
		if err := m.AllowV6.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.WriteConfig(state.Config{DefaultIdleTimeout: time.Minute, GRPCPort: 50001,
		AllowV4Prefixes: uint16(len(e.V4)), AllowV6Prefixes: uint16(len(e.V6))}); err != nil {
		t.Fatal(err)
	}
	spec, err := state.Spec()
	if err != nil {
		t.Fatal(err)
	}
	prog, err := state.LoadProgram(spec, m)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	for _, f := range []explain.Flow{
		{Src: netip.MustParseAddr("203.0.113.9"), Dst: netip.MustParseAddr("192.0.2.1"), Port: 443},
		{Src: netip.MustParseAddr("203.0.113.9"), Dst: netip.MustParseAddr("192.0.2.1"), Port: 443},
		{Src: netip.MustParseAddr("2001:db8::9"), Dst: netip.MustParseAddr("2001:db8:1::1"), Port: 22},
	} {
		pkt, err := f.Frame()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := prog.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
			t.Fatal(err)
		}
	}
}

// aegisctl stats, over gRPC and from the pins, shows each allow rule's
// count.
func TestStatsShowAllowRuleHits(t *testing.T) {
	e := newEnv(t)
	admitThroughRules(t, e.pin)
	want := "[{198.51.100.0/24 1 0} {203.0.113.0/24,tcp/443 2 2} {2001:db8::/32,tcp/22 1 1}]"
	for _, args := range [][]string{e.cmd("stats", "--json"), {"local", "stats", "--json", "--pin-path", e.pin}} {
		var st aegisctl.Stats
		if err := json.Unmarshal([]byte(mustRun(t, args...)), &st); err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(st.AllowRules); got != want || st.AllowUnnumbered != 0 {
			t.Fatalf("%v: allow rules %s (unnumbered %d), want %s", args, got, st.AllowUnnumbered, want)
		}
	}
}
