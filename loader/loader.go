// Package loader is aegis-loader's engine: it creates and pins the data
// path's maps, loads the XDP program over them, attaches it to each
// interface through a pinned bpf_link, writes the config map, swaps in a new
// program build atomically, and tears everything down.
//
// Every step is convergent: a load compares what is pinned with what is
// asked and changes only the difference, so a rerun with the same build and
// flags changes nothing, and a load interrupted half-way is finished by the
// next one. Writers hold an exclusive flock on the pin directory for the
// whole operation.
package loader

import (
	"fmt"
	"net"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
)

// Loader performs loads, upgrades and unloads. Its function fields are the
// seams through which tests inject faults; New fills them with the real
// thing.
type Loader struct {
	Log zerolog.Logger
	// Spec returns the data path to install.
	Spec func() (*ebpf.CollectionSpec, error)
	// Attach attaches an XDP program to an interface through a bpf_link.
	Attach func(link.XDPOptions) (link.Link, error)
	// Update atomically replaces the program of an attached link.
	Update func(link.Link, *ebpf.Program) error
	// AttachTCX attaches a program to a tcx hook through a bpf_link.
	AttachTCX func(link.TCXOptions) (link.Link, error)
	// AttachedMode reports how XDP is attached to an interface.
	AttachedMode func(ifindex int) (Mode, error)
	// OperatorConnections finds the connections the operator runs the
	// loader through, for the lock-out check (lockout.go).
	OperatorConnections func() ([]Connection, error)
	// noGuard disables the guard of unfiltered interfaces: a seam for
	// tests that measure the gap the guard closes.
	noGuard bool
}

// New returns a Loader that installs the data path built into this binary.
func New(log zerolog.Logger) *Loader {
	return &Loader{
		Log:          log,
		Spec:         embeddedSpec,
		Attach:       link.AttachXDP,
		Update:       func(l link.Link, p *ebpf.Program) error { return l.Update(p) },
		AttachTCX:    link.AttachTCX,
		AttachedMode: attachedMode,

		OperatorConnections: func() ([]Connection, error) { return detectConnections(os.Getenv) },
	}
}

// Result says what a load changed. A load that changed nothing has every
// field empty.
type Result struct {
	CreatedMaps []string `json:"created_maps,omitempty"`
	// MigratedMaps were replaced by a copy of this build's layout, in an
	// upgrade from pins of an older layout version.
	MigratedMaps []string `json:"migrated_maps,omitempty"`
	Attached     []string `json:"attached,omitempty"`
	Upgraded     []string `json:"upgraded,omitempty"`
	Reattached   []string `json:"reattached,omitempty"`
	// Unconfigured lists interfaces a previous load configured and this
	// one did not: no longer watched, and left attached if they were.
	Unconfigured []string `json:"unconfigured,omitempty"`
	// EgressAttached, EgressUpgraded and EgressDetached name the
	// interfaces whose egress link of the reply path changed.
	EgressAttached []string `json:"egress_attached,omitempty"`
	EgressUpgraded []string `json:"egress_upgraded,omitempty"`
	EgressDetached []string `json:"egress_detached,omitempty"`
	ConfigWritten  bool     `json:"config_written,omitempty"`
	AllowWritten   bool     `json:"allow_written,omitempty"`
	// Lockout is what the lock-out check found; it changes nothing.
	Lockout []Finding `json:"lockout,omitempty"`
}

// Changed reports whether the load changed anything.
func (r *Result) Changed() bool {
	return len(r.CreatedMaps)+len(r.MigratedMaps)+len(r.Attached)+len(r.Upgraded)+len(r.Reattached)+len(r.Unconfigured) > 0 ||
		len(r.EgressAttached)+len(r.EgressUpgraded)+len(r.EgressDetached) > 0 ||
		r.ConfigWritten || r.AllowWritten
}

// prepare checks cfg and returns its compiled allow rules and this build's
// spec sized by it: what Load and Plan both start from.
func (l *Loader) prepare(cfg *Config) (state.AllowEntries, *ebpf.CollectionSpec, error) {
	if err := cfg.Validate(); err != nil {
		return state.AllowEntries{}, nil, err
	}
	allow, err := state.CompileAllow(cfg.Allow)
	if err != nil {
		return state.AllowEntries{}, nil, err
	}
	spec, err := l.Spec()
	if err != nil {
		return state.AllowEntries{}, nil, fmt.Errorf("load embedded data path: %w", err)
	}
	spec = spec.Copy()
	spec.Maps[state.MapSessionsV4].MaxEntries = cfg.MaxSessions
	spec.Maps[state.MapSessionsV6].MaxEntries = cfg.MaxSessions
	// Room to bury every session at once. Only when created: a pinned
	// tombstone map of another size is kept (checkPinnedMap).
	spec.Maps[state.MapTombsV4].MaxEntries = cfg.MaxSessions
	spec.Maps[state.MapTombsV6].MaxEntries = cfg.MaxSessions
	// The allow maps' capacity is the object's, not the operator's.
	if n4, n6 := spec.Maps[state.MapAllowV4].MaxEntries, spec.Maps[state.MapAllowV6].MaxEntries; len(allow.V4) > int(n4) || len(allow.V6) > int(n6) {
		return state.AllowEntries{}, nil, fmt.Errorf("%w: %d IPv4 and %d IPv6 allow-rule prefixes: this build holds at most %d and %d",
			ErrInvalid, len(allow.V4), len(allow.V6), n4, n6)
	}
	return allow, spec, nil
}

// Load installs or converges the data path to cfg: it creates missing maps
// (and never recreates existing ones; over pins of an older layout version
// it migrates the maps whose layout changed, see migrate.go), writes the config and allow rules if
// they differ, attaches the program to interfaces that lack it, and swaps
// in this build's program wherever another build is running.
//
// Returns an error wrapping one of the package's sentinels when the system
// cannot take the config; what was already changed stays consistent.
func (l *Loader) Load(cfg Config) (_ *Result, err error) {
	allow, spec, err := l.prepare(&cfg)
	if err != nil {
		return nil, err
	}
	if err := checkRoot(); err != nil {
		return nil, err
	}
	if err := checkBPFFS(cfg.PinPath); err != nil {
		return nil, err
	}
	gid, err := lookupGroup(cfg.Group)
	if err != nil {
		return nil, err
	}
	ifaces := make(map[string]int, len(cfg.Interfaces))
	for _, name := range cfg.Interfaces {
		iface, err := net.InterfaceByName(name)
		if err != nil {
			return nil, fmt.Errorf("%w: %q does not exist in this network namespace: check the name with \"ip link\" and pass the public interface with -i",
				ErrNoInterface, name)
		}
		ifaces[name] = iface.Index
	}
	findings, err := l.guard(&cfg, allow, ifaces)
	if err != nil {
		return nil, err
	}
	// No RLIMIT_MEMLOCK dance: the program needs Linux 5.18 or later
	// (bpf_xdp_get_buff_len), and since 5.11 BPF memory is charged to the
	// memory cgroup instead.

	pd, err := lockPinDir(cfg.PinPath, gid, true, l.lockNotice(cfg.PinPath))
	if err != nil {
		return nil, err
	}
	defer pd.Unlock()
	if dir := unsearchable(pd.path, gid); dir != "" {
		l.Log.Warn().Str("dir", dir).Str("group", cfg.Group).
			Msg("the pins' group may not search this directory, so the daemons cannot open the pins: give others search permission (chmod o+x; for the bpffs root, mount it with mode=0711 or install tmpfiles.d/aegis.conf)")
	}

	res := &Result{Lockout: findings}
	defer func() {
		if err != nil && len(res.CreatedMaps) == 0 {
			pd.removeCreated() // nothing pinned: leave no empty directory
		}
	}()
	from, err := pinnedVersion(cfg.PinPath)
	if err != nil {
		return nil, err
	}
	maps, up, err := l.openOrCreateMaps(spec, pd, gid, from, res)
	if err != nil {
		return res, err
	}
	defer maps.Close()
	if err := state.EnsureSweepLock(cfg.PinPath, gid); err != nil {
		return res, err
	}
	defer up.close()
	defer func() {
		if err != nil {
			up.abort(pd.path)
		}
	}()

	if err := l.writeConfig(maps, &cfg, allow, res); err != nil {
		return res, err
	}
	l.pinLocality(spec, pd, gid)
	// Searchable, not listable, by the pins' group: the daemons stat
	// links/<name> to tell a configured interface's link from none; the
	// links themselves stay root's (see internal/state/filtered.go).
	if err := pd.ensureSubdir(state.LinksPath(pd.path), 0o710, gid); err != nil {
		return res, err
	}
	// The daemons beside the program about to run may be of a build that
	// does not mark ports (state/marks.go): the marks are trusted again
	// once they are known to be complete.
	if err := state.DistrustMarks(maps.PortMarks); err != nil {
		return res, err
	}
	if err := l.attachAll(spec, maps, &cfg, ifaces, up.replacing(), res); err != nil {
		l.syncGuard(cfg.PinPath)
		return res, err
	}
	if res.MigratedMaps, err = l.commit(up, pd); err != nil {
		l.syncGuard(cfg.PinPath)
		return res, err
	}
	l.syncGuard(cfg.PinPath)
	if err := l.convergeEgress(spec, maps, &cfg, ifaces, res); err != nil {
		return res, err
	}
	// This build's egress program, which marks the flows it creates, now
	// runs everywhere; the flows earlier ones created are marked here.
	if err := state.TrustFlowMarks(maps.PortMarks, maps.FlowsV4, maps.FlowsV6); err != nil {
		l.Log.Warn().Err(err).Msg("flow marks not trusted: replies cost every lookup until the next load")
	}
	return res, nil
}
