package state_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

func TestConfigRoundTrip(t *testing.T) {
	for _, c := range []state.Config{
		{
			Controller: netip.MustParseAddr("198.51.100.5"), ControllerPort: 443, GRPCPort: 50001,
			DefaultIdleTimeout: time.Minute, Monitor: true, AllowV4Prefixes: 3, AllowV6Prefixes: 2,
			FlowIdleTCP: time.Hour, FlowIdleUDP: 30 * time.Second, FlowIdleICMP: 5 * time.Second,
			EventDropRate: 50, EventPassRate: 7,
		},
		{
			Controller: netip.MustParseAddr("2001:db8::5"), DefaultIdleTimeout: time.Hour, NoFlowTracking: true,
			FlowIdleTCP: 1, FlowIdleUDP: 2, FlowIdleICMP: 3, NoDropEvents: true,
		},
	} {
		v, err := c.Value()
		if err != nil {
			t.Fatal(err)
		}
		if v.LayoutVersion != bpf.LayoutVersion {
			t.Fatalf("layout version %d, want %d", v.LayoutVersion, bpf.LayoutVersion)
		}
		if got := state.ConfigFromValue(&v); got != c {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, c)
		}
	}
}

// Reply tracking is on unless switched off, and unset flow timeouts get
// the documented defaults.
func TestConfigFlowDefaults(t *testing.T) {
	v, err := (&state.Config{DefaultIdleTimeout: time.Minute}).Value()
	if err != nil {
		t.Fatal(err)
	}
	if v.TrackFlows != 1 {
		t.Fatalf("track_flows %d by default, want 1", v.TrackFlows)
	}
	for _, c := range []struct {
		name string
		got  uint64
		want time.Duration
	}{
		{"tcp", v.FlowIdleTcpNs, state.DefaultFlowIdleTCP},
		{"udp", v.FlowIdleUdpNs, state.DefaultFlowIdleUDP},
		{"icmp", v.FlowIdleIcmpNs, state.DefaultFlowIdleICMP},
	} {
		if time.Duration(c.got) != c.want {
			t.Errorf("%s flow idle %v, want %v", c.name, time.Duration(c.got), c.want)
		}
	}
	v, _ = (&state.Config{DefaultIdleTimeout: time.Minute, NoFlowTracking: true}).Value()
	if v.TrackFlows != 0 {
		t.Fatalf("track_flows %d with NoFlowTracking", v.TrackFlows)
	}
}

// Drop events are sampled at the default rate unless configured or turned
// off; pass events are off unless configured.
func TestConfigEventDefaults(t *testing.T) {
	for _, c := range []struct {
		cfg        state.Config
		drop, pass uint16
	}{
		{state.Config{}, state.DefaultEventDropRate, 0},
		{state.Config{EventDropRate: 7, EventPassRate: 3}, 7, 3},
		{state.Config{NoDropEvents: true, EventDropRate: 7}, 0, 0},
	} {
		c.cfg.DefaultIdleTimeout = time.Minute
		v, err := c.cfg.Value()
		if err != nil {
			t.Fatal(err)
		}
		if v.EventDropRate != c.drop || v.EventPassRate != c.pass {
			t.Errorf("%+v: rates %d, %d; want %d, %d", c.cfg, v.EventDropRate, v.EventPassRate, c.drop, c.pass)
		}
	}
}

func TestConfigRejectsNegativeTimeouts(t *testing.T) {
	for _, c := range []state.Config{
		{},
		{DefaultIdleTimeout: -time.Second},
		{DefaultIdleTimeout: time.Minute, FlowIdleTCP: -1},
		{DefaultIdleTimeout: time.Minute, FlowIdleUDP: -1},
		{DefaultIdleTimeout: time.Minute, FlowIdleICMP: -1},
	} {
		if _, err := c.Value(); !errors.Is(err, state.ErrInvalid) {
			t.Errorf("%+v: error %v, want ErrInvalid", c, err)
		}
	}
}
