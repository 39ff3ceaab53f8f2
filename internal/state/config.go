package state

import (
	"fmt"
	"net/netip"
	"time"

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
}

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

// ConfigFromValue decodes a config map value.
func ConfigFromValue(v *bpf.AegisConfigValue) Config {
	c := Config{
		ControllerPort:     v.ControllerPort,
		GRPCPort:           v.GrpcPort,
		DefaultIdleTimeout: time.Duration(v.DefaultIdleTimeoutNs),
		Monitor:            v.Monitor != 0,
		AllowV4Prefixes:    v.AllowV4Rules,
		AllowV6Prefixes:    v.AllowV6Rules,
	}
	switch v.ControllerFamily {
	case 4:
		c.Controller = netip.AddrFrom4(v.ControllerV4)
	case 6:
		c.Controller = netip.AddrFrom16(v.ControllerV6)
	}
	return c
}
