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
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Mode is how XDP is attached.
type Mode string

// Attach modes: auto lets the kernel use the driver's native XDP when it
// has one and generic (skb) XDP otherwise.
const (
	ModeAuto    Mode = "auto"
	ModeNative  Mode = "native"
	ModeGeneric Mode = "generic"
)

func (m Mode) flags() link.XDPAttachFlags {
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
	for _, name := range c.Interfaces {
		if name == "" || len(name) >= unix.IFNAMSIZ || name == "." || name == ".." || filepath.Base(name) != name {
			return fmt.Errorf("%w: interface name %q", ErrInvalid, name)
		}
	}
	return nil
}

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
	// AttachedMode reports how XDP is attached to an interface.
	AttachedMode func(ifindex int) (Mode, error)
}

// New returns a Loader that installs the data path built into this binary.
func New(log zerolog.Logger) *Loader {
	return &Loader{
		Log:          log,
		Spec:         embeddedSpec,
		Attach:       link.AttachXDP,
		Update:       func(l link.Link, p *ebpf.Program) error { return l.Update(p) },
		AttachedMode: attachedMode,
	}
}

// Result says what a load changed. A load that changed nothing has every
// field empty.
type Result struct {
	CreatedMaps   []string `json:"created_maps,omitempty"`
	Attached      []string `json:"attached,omitempty"`
	Upgraded      []string `json:"upgraded,omitempty"`
	Reattached    []string `json:"reattached,omitempty"`
	ConfigWritten bool     `json:"config_written,omitempty"`
	AllowWritten  bool     `json:"allow_written,omitempty"`
}

// Changed reports whether the load changed anything.
func (r *Result) Changed() bool {
	return len(r.CreatedMaps)+len(r.Attached)+len(r.Upgraded)+len(r.Reattached) > 0 ||
		r.ConfigWritten || r.AllowWritten
}

// Load installs or converges the data path to cfg: it creates missing maps
// (and never recreates existing ones), writes the config and allow rules if
// they differ, attaches the program to interfaces that lack it, and swaps
// in this build's program wherever another build is running.
//
// Returns an error wrapping one of the package's sentinels when the system
// cannot take the config; what was already changed stays consistent.
func (l *Loader) Load(cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	allow, err := state.CompileAllow(cfg.Allow)
	if err != nil {
		return nil, err
	}
	if len(allow.V4) > 1024 || len(allow.V6) > 1024 {
		return nil, fmt.Errorf("%w: more than 1024 allow-rule prefixes per family", ErrInvalid)
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
	// No RLIMIT_MEMLOCK dance: the program needs Linux 5.18 or later
	// (bpf_xdp_get_buff_len), and since 5.11 BPF memory is charged to the
	// memory cgroup instead.

	lock, err := lockPinDir(cfg.PinPath, gid, true)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()

	spec, err := l.Spec()
	if err != nil {
		return nil, fmt.Errorf("load embedded data path: %w", err)
	}
	spec = spec.Copy()
	spec.Maps[state.MapSessionsV4].MaxEntries = cfg.MaxSessions
	spec.Maps[state.MapSessionsV6].MaxEntries = cfg.MaxSessions

	if err := checkLayoutVersion(cfg.PinPath); err != nil {
		return nil, err
	}
	res := &Result{}
	maps, err := l.openOrCreateMaps(spec, cfg.PinPath, gid, res)
	if err != nil {
		return res, err
	}
	defer closeMaps(maps)
	if err := state.EnsureSweepLock(cfg.PinPath, gid); err != nil {
		return res, err
	}

	if err := l.writeConfig(maps, &cfg, allow, res); err != nil {
		return res, err
	}
	if err := l.attachAll(spec, maps, &cfg, ifaces, res); err != nil {
		return res, err
	}
	return res, nil
}

func closeMaps(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// checkBPFFS makes sure the nearest existing ancestor of pinPath (or
// pinPath itself) is on bpffs.
func checkBPFFS(pinPath string) error {
	dir := pinPath
	for {
		var st unix.Statfs_t
		err := unix.Statfs(dir, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("%w at %s: mount it with \"mount -t bpf bpf /sys/fs/bpf\" or point --pin-path at a bpffs directory",
					ErrNoBPFFS, dir)
			}
			return nil
		}
		if !errors.Is(err, unix.ENOENT) || dir == "/" {
			return fmt.Errorf("stat %s: %w", dir, err)
		}
		dir = filepath.Dir(dir)
	}
}

func lookupGroup(name string) (int, error) {
	if name == "" {
		return 0, nil
	}
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("%w: %q: create it (systemd-sysusers, or groupadd --system %s) or name another with --group",
			ErrNoGroup, name, name)
	}
	return strconv.Atoi(g.Gid)
}

// ensureDir creates dir if needed and (re)sets its owner and mode.
func ensureDir(dir string, mode os.FileMode, gid int) error {
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := os.Chown(dir, 0, gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}

// lockPinDir takes the pin directory's flock, creating the directory when
// create is set. It retries when the directory it locked was removed or
// replaced meanwhile (an unload ran first), so the lock it returns is on the
// directory at pinPath.
func lockPinDir(pinPath string, gid int, create bool) (*state.Lock, error) {
	for range 10 {
		if create {
			if err := os.MkdirAll(pinPath, 0o750); err != nil {
				return nil, fmt.Errorf("create %s: %w", pinPath, err)
			}
		}
		lock, err := state.LockDir(pinPath, true)
		if errors.Is(err, fs.ErrNotExist) && create {
			continue // removed between mkdir and open: an unload ran
		}
		if err != nil {
			return nil, err
		}
		var locked, current unix.Stat_t
		if unix.Fstat(int(lock.File().Fd()), &locked) == nil && unix.Stat(pinPath, &current) == nil &&
			locked.Dev == current.Dev && locked.Ino == current.Ino {
			if create {
				// Owner and mode are set under the lock, so that an unload
				// cannot remove the directory in between.
				if err := ensureDir(pinPath, 0o750, gid); err != nil {
					lock.Unlock()
					return nil, err
				}
			}
			return lock, nil
		}
		lock.Unlock()
		if !create {
			return nil, fs.ErrNotExist
		}
	}
	return nil, fmt.Errorf("lock %s: the directory keeps being replaced", pinPath)
}

// pinMode is the file mode of each pin: the daemons (group aegis) write
// sessions and the sweep sequence and only read the rest; nothing is
// world-accessible.
func pinMode(name string) os.FileMode {
	if name == state.MapSessionsV4 || name == state.MapSessionsV6 || name == state.MapSweepSeq {
		return 0o660
	}
	return 0o640
}

// openOrCreateMaps opens each pinned map, checking it against spec, and
// creates and pins the missing ones. An existing map is never replaced.
func (l *Loader) openOrCreateMaps(spec *ebpf.CollectionSpec, pinPath string, gid int, res *Result) (map[string]*ebpf.Map, error) {
	maps := make(map[string]*ebpf.Map, len(state.MapNames))
	for _, name := range state.MapNames {
		ms := spec.Maps[name]
		path := state.MapPath(pinPath, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		switch {
		case err == nil:
			if err := checkPinnedMap(ms, m, path); err != nil {
				m.Close()
				closeMaps(maps)
				return nil, err
			}
		case errors.Is(err, fs.ErrNotExist):
			if m, err = ebpf.NewMap(ms); err != nil {
				closeMaps(maps)
				return nil, fmt.Errorf("create map %s: %w", name, err)
			}
			if err := m.Pin(path); err != nil {
				m.Close()
				closeMaps(maps)
				return nil, fmt.Errorf("pin map %s: %w", path, err)
			}
			res.CreatedMaps = append(res.CreatedMaps, name)
			l.Log.Info().Str("map", name).Uint32("capacity", m.MaxEntries()).Msg("created map")
		default:
			closeMaps(maps)
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		maps[name] = m
		if err := os.Chown(path, 0, gid); err != nil {
			closeMaps(maps)
			return nil, fmt.Errorf("chown %s: %w", path, err)
		}
		if err := os.Chmod(path, pinMode(name)); err != nil {
			closeMaps(maps)
			return nil, fmt.Errorf("chmod %s: %w", path, err)
		}
	}
	return maps, nil
}

// checkLayoutVersion refuses pins written with another layout version,
// which the config map records in its first field.
func checkLayoutVersion(pinPath string) error {
	path := state.MapPath(pinPath, state.MapConfig)
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned map %s: %w", path, err)
	}
	defer m.Close()
	raw, err := m.LookupBytes(uint32(0))
	if err != nil || len(raw) < 4 {
		return fmt.Errorf("read %s: %v", path, err)
	}
	switch v := binary.NativeEndian.Uint32(raw); v {
	case 0, bpf.LayoutVersion: // 0: created, config not yet written
		return nil
	default:
		return fmt.Errorf("%w: the maps under %s have layout version %d and this aegis-loader writes version %d, with no migration between them: run the aegis-loader that made them, or \"aegis-loader unload\" to start empty (drops every session)",
			ErrIncompatible, pinPath, v, bpf.LayoutVersion)
	}
}

// checkPinnedMap refuses a pinned map this build cannot use as it is.
func checkPinnedMap(ms *ebpf.MapSpec, m *ebpf.Map, path string) error {
	if ms.Name == state.MapSessionsV4 || ms.Name == state.MapSessionsV6 {
		if m.MaxEntries() != ms.MaxEntries {
			return fmt.Errorf("%w: %s holds up to %d sessions, --max-sessions asks for %d: load with --max-sessions %d to keep the sessions, or run \"aegis-loader unload\" first (which drops them)",
				ErrCapacityChange, path, m.MaxEntries(), ms.MaxEntries, m.MaxEntries())
		}
	}
	if err := ms.Compatible(m); err != nil {
		return fmt.Errorf("%w: %s: %v: this build cannot use the pinned map; run the previous aegis-loader, or \"aegis-loader unload\" to start empty",
			ErrIncompatible, path, err)
	}
	if err := checkBTFLayout(ms, m); errors.Is(err, errBTFUnreadable) {
		// Reading a map's BTF needs CAP_SYS_ADMIN, which the loader's unit
		// does not grant; the layout version covers this case.
	} else if err != nil {
		return fmt.Errorf("%w: %s: %v: this build cannot use the pinned map; run the previous aegis-loader, or \"aegis-loader unload\" to start empty",
			ErrIncompatible, path, err)
	}
	return nil
}

// writeConfig brings the allow maps and the config map to cfg. New allow
// entries go in before the config announces them and stale ones go after
// it stops counting them, so no packet sees a rule half-installed.
func (l *Loader) writeConfig(maps map[string]*ebpf.Map, cfg *Config, allow state.AllowEntries, res *Result) error {
	if err := syncAllow(maps[state.MapAllowV4], allow.V4, false, res); err != nil {
		return err
	}
	if err := syncAllow(maps[state.MapAllowV6], allow.V6, false, res); err != nil {
		return err
	}

	c := state.Config{
		Controller:         cfg.Controller,
		ControllerPort:     cfg.ControllerPort,
		GRPCPort:           cfg.GRPCPort,
		DefaultIdleTimeout: cfg.RuleTimeout,
		Monitor:            cfg.Monitor,
		AllowV4Prefixes:    uint16(len(allow.V4)),
		AllowV6Prefixes:    uint16(len(allow.V6)),
	}
	want, err := c.Value()
	if err != nil {
		return err
	}
	var have bpf.AegisConfigValue
	if err := maps[state.MapConfig].Lookup(uint32(0), &have); err != nil {
		return fmt.Errorf("read config map: %w", err)
	}
	if have != want {
		if err := maps[state.MapConfig].Put(uint32(0), &want); err != nil {
			return fmt.Errorf("write config map: %w", err)
		}
		res.ConfigWritten = true
		l.Log.Info().Stringer("controller", cfg.Controller).Uint16("controller_port", cfg.ControllerPort).
			Uint16("grpc_port", cfg.GRPCPort).Stringer("rule_timeout", cfg.RuleTimeout).Bool("monitor", cfg.Monitor).
			Int("allow_prefixes", len(allow.V4)+len(allow.V6)).Msg("wrote config")
	}

	if err := syncAllow(maps[state.MapAllowV4], allow.V4, true, res); err != nil {
		return err
	}
	return syncAllow(maps[state.MapAllowV6], allow.V6, true, res)
}

// syncAllow upserts the wanted entries that differ, or (prune) deletes the
// entries that are not wanted.
func syncAllow[K comparable](m *ebpf.Map, want map[K]bpf.AegisAllowValue, prune bool, res *Result) error {
	have := make(map[K]bpf.AegisAllowValue)
	var k K
	var v bpf.AegisAllowValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", m, err)
	}
	if prune {
		for k := range have {
			if _, ok := want[k]; !ok {
				if err := m.Delete(&k); err != nil {
					return fmt.Errorf("delete allow rule: %w", err)
				}
				res.AllowWritten = true
			}
		}
		return nil
	}
	for k, v := range want {
		if old, ok := have[k]; ok && old == v {
			continue
		}
		if err := m.Put(&k, &v); err != nil {
			return fmt.Errorf("write allow rule: %w", err)
		}
		res.AllowWritten = true
	}
	return nil
}

// attachAll makes every requested interface, and every interface already
// attached, run this build's program, pinned as state.ProgramPin.
//
// An upgrade loads the new build, pins it beside the old one, moves every
// link to it with link.Update (atomic per interface: each packet sees the
// old or the new program) and renames its pin over the old one. Should it
// stop half-way, the next load finds links on different programs and
// converges them.
func (l *Loader) attachAll(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map, cfg *Config, ifaces map[string]int, res *Result) error {
	linksDir := filepath.Join(cfg.PinPath, state.LinksDir)
	if err := ensureDir(linksDir, 0o700, 0); err != nil {
		return err
	}
	progPath := filepath.Join(cfg.PinPath, state.ProgramPin)
	nextPath := filepath.Join(cfg.PinPath, state.ProgramNextPin)
	_ = os.Remove(nextPath) // left by an interrupted upgrade

	prog, fresh, err := l.currentProgram(spec, maps, progPath)
	if err != nil {
		return err
	}
	defer prog.Close()
	if fresh {
		if err := prog.Pin(nextPath); err != nil {
			return fmt.Errorf("pin program %s: %w", nextPath, err)
		}
		_ = os.Chmod(nextPath, 0o600)
	}
	progID, err := programID(prog)
	if err != nil {
		return err
	}

	entries, err := os.ReadDir(linksDir)
	if err != nil {
		return fmt.Errorf("read %s: %w", linksDir, err)
	}
	attached := make(map[string]bool)
	for _, e := range entries {
		name := state.IfnameFromLinkPin(e.Name())
		path := filepath.Join(linksDir, e.Name())
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", path, err)
		}
		err = l.convergeLink(lk, path, name, ifaces, cfg, prog, progID, res)
		lk.Close()
		if errors.Is(err, errStaleLink) {
			continue // unpinned; attached afresh below if requested
		}
		if err != nil {
			return err
		}
		attached[name] = true
		if _, ok := ifaces[name]; !ok {
			l.Log.Warn().Str("iface", name).
				Msg("interface is attached but not in --iface; left attached (\"aegis-loader unload -i " + name + "\" detaches it)")
		}
	}

	names := make([]string, 0, len(ifaces))
	for name := range ifaces {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if attached[name] {
			continue
		}
		if err := l.attach(prog, name, ifaces[name], cfg.Mode, state.LinkPath(cfg.PinPath, name)); err != nil {
			return err
		}
		res.Attached = append(res.Attached, name)
	}

	if fresh {
		if err := os.Rename(nextPath, progPath); err != nil {
			return fmt.Errorf("replace program pin %s: %w", progPath, err)
		}
	}
	return nil
}

// currentProgram returns the pinned program if it is this build, or this
// build freshly loaded against the pinned maps (fresh=true).
func (l *Loader) currentProgram(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map, progPath string) (_ *ebpf.Program, fresh bool, _ error) {
	pinned, err := ebpf.LoadPinnedProgram(progPath, nil)
	switch {
	case err == nil:
		info, err := pinned.Info()
		if err == nil && spec.Programs[progName].Compatible(info) == nil {
			return pinned, false, nil
		}
		pinned.Close()
	case !errors.Is(err, fs.ErrNotExist):
		return nil, false, fmt.Errorf("open pinned program %s: %w", progPath, err)
	}
	prog, err := loadProgram(spec, maps)
	return prog, true, err
}

func programID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect program: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("inspect program: kernel reports no program id")
	}
	return id, nil
}

var errStaleLink = errors.New("stale link")

const progName = "aegis_xdp"

// convergeLink checks one pinned link: still attached to the interface of
// that name, in the mode asked, running prog. It moves the link to prog
// in place when it runs anything else.
func (l *Loader) convergeLink(lk link.Link, path, name string, ifaces map[string]int, cfg *Config,
	prog *ebpf.Program, progID ebpf.ProgramID, res *Result) error {
	info, err := lk.Info()
	if err != nil {
		return fmt.Errorf("inspect link %s: %w", path, err)
	}
	xdp := info.XDP()
	ifindex := 0
	if xdp != nil {
		ifindex = int(xdp.Ifindex)
	}
	want, requested := ifaces[name]
	if ifindex == 0 || (requested && ifindex != want) {
		// The interface went away (the kernel detached the link) or was
		// replaced by another of the same name.
		l.Log.Warn().Str("iface", name).Msg("pinned link no longer attached to the interface; replacing it")
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove stale link %s: %w", path, err)
		}
		if requested {
			res.Reattached = append(res.Reattached, name)
		}
		return errStaleLink
	}

	if requested && cfg.Mode != ModeAuto {
		mode, err := l.AttachedMode(ifindex)
		if err != nil {
			return err
		}
		if mode != cfg.Mode {
			return fmt.Errorf("%w: %s runs XDP in %s mode, --mode asks for %s: run \"aegis-loader unload -i %s\" and load again (the interface passes unfiltered in between), or keep --mode %s",
				ErrModeChange, name, mode, cfg.Mode, name, mode)
		}
	}

	if info.Program == progID {
		l.Log.Debug().Str("iface", name).Uint32("program", uint32(progID)).Msg("program up to date")
		return nil
	}
	if err := l.Update(lk, prog); err != nil {
		return fmt.Errorf("upgrade program on %s: %w", name, err)
	}
	res.Upgraded = append(res.Upgraded, name)
	l.Log.Info().Str("iface", name).Uint32("old_program", uint32(info.Program)).
		Uint32("new_program", uint32(progID)).Msg("upgraded program in place")
	return nil
}

// loadProgram loads the XDP program against the pinned maps.
func loadProgram(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: maps})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
				return nil, fmt.Errorf("the kernel's verifier refused the XDP program for lack of privilege: aegis-loader needs CAP_BPF, CAP_PERFMON (variable-offset packet parsing) and CAP_NET_ADMIN: %v", ve)
			}
			return nil, fmt.Errorf("the kernel's verifier rejected the XDP program: %v", ve)
		}
		return nil, fmt.Errorf("load XDP program: %w", err)
	}
	defer coll.Close()
	return coll.DetachProgram(progName), nil
}

func (l *Loader) attach(prog *ebpf.Program, name string, ifindex int, mode Mode, path string) error {
	lk, err := l.Attach(link.XDPOptions{Program: prog, Interface: ifindex, Flags: mode.flags()})
	if err != nil {
		switch {
		case errors.Is(err, ebpf.ErrNotSupported):
			return fmt.Errorf("%w: cannot attach to %s: XDP links need Linux 5.9 or later", ErrNoXDPLink, name)
		case errors.Is(err, unix.EBUSY), errors.Is(err, unix.EEXIST):
			return fmt.Errorf("%w: %s: inspect it with \"bpftool net show dev %s\" and detach it with \"ip link set dev %s xdp off\"",
				ErrXDPBusy, name, name, name)
		case mode == ModeNative && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)):
			return fmt.Errorf("%w: %s has no native XDP: use --mode generic (or auto)", ErrModeUnsupported, name)
		}
		return fmt.Errorf("attach XDP to %s: %w", name, err)
	}
	if err := lk.Pin(path); err != nil {
		lk.Close() // detaches: nothing is left half-done
		return fmt.Errorf("pin link %s: %w", path, err)
	}
	lk.Close() // the pin keeps it attached
	l.Log.Info().Str("iface", name).Int("ifindex", ifindex).Str("mode", string(mode)).Msg("attached XDP program")
	return nil
}
