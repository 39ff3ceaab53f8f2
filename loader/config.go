package loader

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/state"
)

// Mode is how XDP is attached; the configured-interfaces record keeps it.
type Mode = state.AttachMode

// Attach modes: auto lets the kernel use the driver's native XDP when it
// has one and generic (skb) XDP otherwise.
const (
	ModeAuto    = state.ModeAuto
	ModeNative  = state.ModeNative
	ModeGeneric = state.ModeGeneric
)

func modeFlags(m Mode) link.XDPAttachFlags {
	switch m {
	case ModeNative:
		return link.XDPDriverMode
	case ModeGeneric:
		return link.XDPGenericMode
	}
	return 0
}

// MaxSessionsLimit bounds --max-sessions. Sessions maps allocate on insert,
// but the kernel sizes the bucket array for the capacity up front.
const MaxSessionsLimit = 1 << 24

// Config is what a load installs.
type Config struct {
	PinPath        string
	Interfaces     []string
	Controller     netip.Addr
	ControllerPort uint16
	GRPCPort       uint16
	RuleTimeout    time.Duration
	Mode           Mode
	MaxSessions    uint32
	Allow          []state.AllowRule
	Monitor        bool
	Group          string
	// NoLockoutCheck loads even when the lock-out check (lockout.go) finds
	// that the filter would cut the operator's own session.
	NoLockoutCheck bool
	// NoReplyTracking leaves the egress program off the interfaces and
	// tells the data path to honour no flow: only sessions, allow rules
	// and the bypasses pass.
	NoReplyTracking bool
	// FlowIdleTCP, FlowIdleUDP and FlowIdleICMP are the flows' idle
	// timeouts; zero for the data path's defaults (state.Config).
	FlowIdleTCP  time.Duration
	FlowIdleUDP  time.Duration
	FlowIdleICMP time.Duration
}

// Validate checks what can be checked without touching the system.
func (c *Config) Validate() error {
	switch {
	case c.PinPath == "" || !filepath.IsAbs(c.PinPath):
		return fmt.Errorf("%w: --pin-path %q: must be an absolute path on bpffs", ErrInvalid, c.PinPath)
	case len(c.Interfaces) == 0:
		return fmt.Errorf("%w: no interface: name the public interface with -i", ErrInvalid)
	case c.ControllerPort == 0:
		return fmt.Errorf("%w: --port 0: the controller's login port must be 1-65535", ErrInvalid)
	case c.GRPCPort == 0:
		return fmt.Errorf("%w: --grpc-port 0: the agent's gRPC port must be 1-65535", ErrInvalid)
	case c.RuleTimeout < time.Second:
		return fmt.Errorf("%w: --rule-timeout %v: the default idle timeout must be at least 1s", ErrInvalid, c.RuleTimeout)
	case c.MaxSessions == 0 || c.MaxSessions > MaxSessionsLimit:
		return fmt.Errorf("%w: --max-sessions %d: must be 1-%d", ErrInvalid, c.MaxSessions, MaxSessionsLimit)
	case c.Mode != ModeAuto && c.Mode != ModeNative && c.Mode != ModeGeneric:
		return fmt.Errorf("%w: --mode %q: want auto, native or generic", ErrInvalid, c.Mode)
	case c.Controller.IsValid() && (c.Controller.IsUnspecified() || c.Controller.Zone() != ""):
		return fmt.Errorf("%w: --ip %s: the controller needs a specific address", ErrInvalid, c.Controller)
	}
	for _, f := range []struct {
		flag string
		d    time.Duration
	}{{"--flow-idle-tcp", c.FlowIdleTCP}, {"--flow-idle-udp", c.FlowIdleUDP}, {"--flow-idle-icmp", c.FlowIdleICMP}} {
		if f.d != 0 && f.d < time.Second {
			return fmt.Errorf("%w: %s %v: a flow's idle timeout must be at least 1s", ErrInvalid, f.flag, f.d)
		}
	}
	for _, name := range c.Interfaces {
		if name == "" || len(name) >= unix.IFNAMSIZ || name == "." || name == ".." || filepath.Base(name) != name {
			return fmt.Errorf("%w: interface name %q", ErrInvalid, name)
		}
	}
	return nil
}
