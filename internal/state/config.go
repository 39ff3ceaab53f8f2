package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// Config is the content of the config map, written by the loader from its
// flags and read by the data path on every packet.
type Config struct {
	// Controller is the Aegis controller's address; the zero Addr disables
	// the controller bypass.
	Controller netip.Addr
	// ControllerPort is the controller's login port (TCP).
	ControllerPort uint16
	// GRPCPort is the agent's gRPC port the controller dials (TCP).
	GRPCPort uint16
	// DefaultIdleTimeout applies to sessions without their own.
	DefaultIdleTimeout time.Duration
	// Monitor passes would-be drops and counts them as monitor.
	Monitor bool
	// AllowV4Prefixes and AllowV6Prefixes are the entries of allow_v4 and
	// allow_v6; zero lets the data path skip the lookup.
	AllowV4Prefixes uint16
	AllowV6Prefixes uint16
	// NoFlowTracking stops the data path from recording the flows the
	// gateway opens outbound and passing their replies. Sessions and allow
	// rules are unaffected.
	NoFlowTracking bool
	// FlowIdleTCP, FlowIdleUDP and FlowIdleICMP are how long a flow of that
	// protocol lives without a packet in either direction; zero for
	// DefaultFlowIdleTCP, DefaultFlowIdleUDP and DefaultFlowIdleICMP.
	FlowIdleTCP  time.Duration
	FlowIdleUDP  time.Duration
	FlowIdleICMP time.Duration
	// EventDropRate is how many verdict events per second each CPU may
	// emit for drops (and would-be drops in monitor mode); zero for
	// DefaultEventDropRate. NoDropEvents emits none.
	EventDropRate uint16
	NoDropEvents  bool
	// EventPassRate is the same for passes; zero, the default, emits none.
	EventPassRate uint16
}

// DefaultEventDropRate is the drop events each CPU emits per second unless
// configured: enough to see who knocks, and at a flood a cost per dropped
// packet of a bucket check (the events themselves then cost at most 100
// ring buffer writes per CPU per second). Passes emit nothing by default:
// on a busy gateway nearly every packet passes, and a sample of them says
// little that the counters do not.
const DefaultEventDropRate = 100

// Flow idle timeouts unless configured. TCP: longer than the 2 hours after
// which Linux starts keepalives, so that an idle connection kept alive from
// this side survives (a flow is not closed by FIN or RST, and least
// recently used flows are evicted first when the map fills). UDP and ICMP
// echo: the figures netfilter's conntrack uses for an assured UDP stream
// and for ICMP.
const (
	DefaultFlowIdleTCP  = 6 * time.Hour
	DefaultFlowIdleUDP  = 2 * time.Minute
	DefaultFlowIdleICMP = 30 * time.Second
)

// Value encodes the config for the config map. It returns an error wrapping
// ErrInvalid for a config the data path could not apply.
func (c *Config) Value() (bpf.AegisConfigValue, error) {
	v := bpf.AegisConfigValue{
		LayoutVersion:        bpf.LayoutVersion,
		ControllerPort:       c.ControllerPort,
		GrpcPort:             c.GRPCPort,
		AllowV4Rules:         c.AllowV4Prefixes,
		AllowV6Rules:         c.AllowV6Prefixes,
		DefaultIdleTimeoutNs: uint64(c.DefaultIdleTimeout),
	}
	if c.DefaultIdleTimeout <= 0 {
		return v, fmt.Errorf("%w: default idle timeout must be positive", ErrInvalid)
	}
	if c.Monitor {
		v.Monitor = 1
	}
	if !c.NoFlowTracking {
		v.TrackFlows = 1
	}
	switch {
	case c.NoDropEvents:
	case c.EventDropRate == 0:
		v.EventDropRate = DefaultEventDropRate
	default:
		v.EventDropRate = c.EventDropRate
	}
	v.EventPassRate = c.EventPassRate
	for _, f := range []struct {
		name string
		set  time.Duration
		def  time.Duration
		dst  *uint64
	}{
		{"tcp", c.FlowIdleTCP, DefaultFlowIdleTCP, &v.FlowIdleTcpNs},
		{"udp", c.FlowIdleUDP, DefaultFlowIdleUDP, &v.FlowIdleUdpNs},
		{"icmp", c.FlowIdleICMP, DefaultFlowIdleICMP, &v.FlowIdleIcmpNs},
	} {
		switch {
		case f.set < 0:
			return v, fmt.Errorf("%w: %s flow idle timeout must not be negative", ErrInvalid, f.name)
		case f.set == 0:
			*f.dst = uint64(f.def)
		default:
			*f.dst = uint64(f.set)
		}
	}
	switch a := c.Controller; {
	case !a.IsValid():
	case a.Is4() || a.Is4In6():
		v.ControllerFamily = 4
		v.ControllerV4 = a.Unmap().As4()
	default:
		v.ControllerFamily = 6
		v.ControllerV6 = a.As16()
	}
	return v, nil
}

// configFromValue decodes a config map value. Flow idle timeouts come back
// as stored: the defaults Value filled in are explicit here.
func configFromValue(v *bpf.AegisConfigValue) Config {
	c := Config{
		ControllerPort:     v.ControllerPort,
		GRPCPort:           v.GrpcPort,
		DefaultIdleTimeout: time.Duration(v.DefaultIdleTimeoutNs),
		Monitor:            v.Monitor != 0,
		AllowV4Prefixes:    v.AllowV4Rules,
		AllowV6Prefixes:    v.AllowV6Rules,
		NoFlowTracking:     v.TrackFlows == 0,
		FlowIdleTCP:        time.Duration(v.FlowIdleTcpNs),
		FlowIdleUDP:        time.Duration(v.FlowIdleUdpNs),
		FlowIdleICMP:       time.Duration(v.FlowIdleIcmpNs),
		EventDropRate:      v.EventDropRate,
		NoDropEvents:       v.EventDropRate == 0,
		EventPassRate:      v.EventPassRate,
	}
	switch v.ControllerFamily {
	case 4:
		c.Controller = netip.AddrFrom4(v.ControllerV4)
	case 6:
		c.Controller = netip.AddrFrom16(v.ControllerV6)
	}
	return c
}

// The layout version must be the config value's first field: it is read
// from maps of any layout, whose values may be of another size.
var _ [0]struct{} = [unsafe.Offsetof(bpf.AegisConfigValue{}.LayoutVersion)]struct{}{}

// ReadLayoutVersion returns the layout version recorded in a config map, 0
// if the config was never written. It reads only the first field, so it
// works on the config map of any layout version.
func ReadLayoutVersion(config *ebpf.Map) (uint32, error) {
	raw, err := config.LookupBytes(uint32(0))
	if err != nil {
		return 0, fmt.Errorf("read config: %w", err)
	}
	if len(raw) < 4 {
		return 0, fmt.Errorf("read config: %w: value of %d bytes has no layout version", ErrIncompatible, len(raw))
	}
	return binary.NativeEndian.Uint32(raw), nil
}

// PinnedLayoutVersion returns the layout version of the config map pinned
// under pinPath, and ok=false if there is none.
func PinnedLayoutVersion(pinPath string) (v uint32, ok bool, err error) {
	path := MapPath(pinPath, MapConfig)
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, openError(path, err)
	}
	defer m.Close()
	v, err = ReadLayoutVersion(m)
	return v, err == nil, err
}

// ReadConfig returns the config map's content.
func (m *Maps) ReadConfig() (Config, error) {
	var v bpf.AegisConfigValue
	if err := m.Config.Lookup(uint32(0), &v); err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	return configFromValue(&v), nil
}

// WriteConfig writes c to the config map unless it already holds it, and
// reports whether it wrote. The data path reads the value on every packet;
// an array map update replaces it whole, so no packet sees half a config.
func (m *Maps) WriteConfig(c Config) (written bool, err error) {
	want, err := c.Value()
	if err != nil {
		return false, err
	}
	var have bpf.AegisConfigValue
	if err := m.Config.Lookup(uint32(0), &have); err != nil {
		return false, fmt.Errorf("read config: %w", err)
	}
	if have == want {
		return false, nil
	}
	if err := m.Config.Put(uint32(0), &want); err != nil {
		return false, fmt.Errorf("write config: %w", err)
	}
	return true, nil
}
