package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// A dry run answers "what would this load do?" by reading only: pins are
// opened read-only, no lock is taken (a flock leaves nothing behind, but a
// dry run must not wait on a running loader either), no directory is
// created, nothing is written. What it prints can be stale by the time a
// real load runs, which checks everything again.

// Plan is what a load of a config would do.
type Plan struct {
	PinPath     string          `json:"pin_path"`
	Interfaces  []PlanInterface `json:"interfaces"`
	Mode        Mode            `json:"mode"`
	Bypasses    []string        `json:"bypasses"`
	Allow       []string        `json:"allow"`
	Monitor     bool            `json:"monitor"`
	RuleTimeout string          `json:"rule_timeout"`
	MaxSessions uint32          `json:"max_sessions"`
	// Change is the program change: "new install", "no change" (this
	// build is pinned), or "upgrade" (from PinnedTag to this build).
	Change string `json:"change"`
	// Tag is this build's program tag, known once it is loaded: the
	// kernel computes it over the instructions as relocated.
	Tag       string `json:"tag,omitempty"`
	PinnedTag string `json:"pinned_tag,omitempty"`
	// ConfigChanges lists the config fields whose pinned value differs.
	ConfigChanges []FieldChange `json:"config_changes,omitempty"`
	Lockout       []Finding     `json:"lockout,omitempty"`
	// BuiltinDefaults lists the flags that would take their built-in
	// default (the original agent's eth0 and 172.21.0.5).
	BuiltinDefaults []string `json:"builtin_defaults,omitempty"`
	// Refused reports that the load would be refused, and why.
	Refused string `json:"refused,omitempty"`
}

// PlanInterface is one interface a load concerns.
type PlanInterface struct {
	Name   string   `json:"name"`
	Exists bool     `json:"exists"`
	XDP    XDPState `json:"xdp"`
	// Action is "attach", "keep" (already runs the filter), "upgrade",
	// "left attached" (pinned but not in --iface) or "refuse" (missing,
	// or a foreign program holds it).
	Action string `json:"action"`
}

// FieldChange is one config field a load rewrites.
type FieldChange struct {
	Field string `json:"field"`
	From  string `json:"from"`
	To    string `json:"to"`
}

// Plan returns what Load(cfg) would do, changing nothing.
func (l *Loader) Plan(cfg Config) (*Plan, error) {
	allow, spec, err := l.prepare(&cfg)
	if err != nil {
		return nil, err
	}
	p := &Plan{PinPath: cfg.PinPath, Mode: cfg.Mode, Monitor: cfg.Monitor,
		RuleTimeout: cfg.RuleTimeout.String(), MaxSessions: cfg.MaxSessions}
	p.Bypasses = bypasses(&cfg)
	for _, r := range cfg.Allow {
		p.Allow = append(p.Allow, state.FormatAllowRule(r))
	}

	pinnedProg := uint32(0)
	switch prog, err := ebpf.LoadPinnedProgram(state.ProgramPath(cfg.PinPath), &ebpf.LoadPinOptions{ReadOnly: true}); {
	case err == nil:
		if info, err := prog.Info(); err == nil {
			p.PinnedTag = info.Tag
			id, _ := info.ID()
			pinnedProg = uint32(id)
		}
		if sameBuild(spec, prog) {
			p.Change = "no change"
			p.Tag = p.PinnedTag
		} else {
			p.Change = "upgrade"
		}
		prog.Close()
	case errors.Is(err, fs.ErrNotExist):
		p.Change = "new install"
	default:
		p.Change = "unknown"
		p.Refused = fmt.Sprintf("cannot read the pinned program: %v", err)
	}
	p.ConfigChanges = configChanges(&cfg)

	linked, _ := state.LinkedInterfaces(cfg.PinPath)
	ifaces := map[string]int{}
	names := slices.Clone(cfg.Interfaces)
	for _, n := range linked {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	for _, name := range names {
		pi := PlanInterface{Name: name}
		requested := slices.Contains(cfg.Interfaces, name)
		ifindex := 0
		if iface, err := net.InterfaceByName(name); err == nil {
			pi.Exists, ifindex = true, iface.Index
			if requested {
				ifaces[name] = iface.Index
			}
			pi.XDP, _ = xdpState(iface.Index)
		}
		ours := pinnedLinkID(cfg.PinPath, name)
		switch {
		case !requested:
			pi.Action = "left attached"
		case !pi.Exists:
			pi.Action = "refuse"
			p.refuse(fmt.Sprintf("%s does not exist", name))
		case ours != 0 && ours == pi.XDP.LinkID && pi.XDP.ProgramID == pinnedProg && p.Change == "no change":
			pi.Action = "keep"
		case ours != 0 && ours == pi.XDP.LinkID:
			pi.Action = "upgrade"
		case pi.XDP.Attached:
			pi.Action = "refuse"
			p.refuse(fmt.Sprintf("%s already has a foreign XDP program: %s", name, foreignXDPHint(name, ifindex)))
		default:
			pi.Action = "attach"
		}
		p.Interfaces = append(p.Interfaces, pi)
	}

	p.Lockout, err = l.guard(&cfg, allow, ifaces)
	if errors.Is(err, ErrLockout) {
		p.refuse(err.Error())
	} else if err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Plan) refuse(why string) {
	if p.Refused == "" {
		p.Refused = why
	}
}

// pinnedLinkID is the id of the link pinned for an interface, or 0.
func pinnedLinkID(pinPath, name string) uint32 {
	lk, err := link.LoadPinnedLink(state.LinkPath(pinPath, name), nil)
	if err != nil {
		return 0
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return 0
	}
	return uint32(info.ID)
}

// bypasses lists what the data path passes whatever the sessions, in the
// terms of the config.
func bypasses(cfg *Config) []string {
	out := []string{"arp", "ndp (IPv6 neighbour discovery to this link)"}
	if cfg.Controller.IsValid() {
		out = append(out,
			fmt.Sprintf("controller login: tcp to %s", netip.AddrPortFrom(cfg.Controller, cfg.ControllerPort)),
			fmt.Sprintf("controller to agent gRPC: tcp from %s to dport %d on this host", cfg.Controller, cfg.GRPCPort))
	}
	return out
}

// configChanges compares the pinned config and allow rules with cfg's.
func configChanges(cfg *Config) []FieldChange {
	m, err := ebpf.LoadPinnedMap(state.MapPath(cfg.PinPath, state.MapConfig), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil
	}
	defer m.Close()
	have, err := (&state.Maps{Config: m}).ReadConfig()
	if err != nil {
		return nil
	}
	var out []FieldChange
	add := func(field string, from, to any) {
		f, t := fmt.Sprint(from), fmt.Sprint(to)
		if f != t {
			out = append(out, FieldChange{Field: field, From: f, To: t})
		}
	}
	ctl := func(a netip.Addr) string {
		if !a.IsValid() {
			return "none"
		}
		return a.String()
	}
	add("controller", ctl(have.Controller), ctl(cfg.Controller))
	add("controller_port", have.ControllerPort, cfg.ControllerPort)
	add("grpc_port", have.GRPCPort, cfg.GRPCPort)
	add("rule_timeout", have.DefaultIdleTimeout, cfg.RuleTimeout)
	add("monitor", have.Monitor, cfg.Monitor)

	if rules, same, ok := pinnedAllow(cfg.PinPath, cfg.Allow); ok && !same {
		want := make([]state.AllowRule, len(cfg.Allow))
		copy(want, cfg.Allow)
		// The same rules stored differently (without rule ids, by an older
		// loader) are rewritten, but that changes nothing that passes.
		add("allow", formatRules(rules), formatRules(want))
	}
	if s4, err := ebpf.LoadPinnedMap(state.MapPath(cfg.PinPath, state.MapSessionsV4), &ebpf.LoadPinOptions{ReadOnly: true}); err == nil {
		if s4.MaxEntries() != cfg.MaxSessions {
			out = append(out, FieldChange{Field: "max_sessions", From: fmt.Sprint(s4.MaxEntries()), To: fmt.Sprint(cfg.MaxSessions)})
		}
		s4.Close()
	}
	return out
}

// pinnedAllow reads the pinned allow rules and reports whether the maps
// hold exactly the entries a load of rules would write (keeping the
// pinned rules' ids, as a load does).
func pinnedAllow(pinPath string, wantRules []state.AllowRule) (rules []state.AllowRule, same, ok bool) {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	a4, err := ebpf.LoadPinnedMap(state.MapPath(pinPath, state.MapAllowV4), ro)
	if err != nil {
		return nil, false, false
	}
	defer a4.Close()
	a6, err := ebpf.LoadPinnedMap(state.MapPath(pinPath, state.MapAllowV6), ro)
	if err != nil {
		return nil, false, false
	}
	defer a6.Close()
	pinned := &state.Maps{AllowV4: a4, AllowV6: a6}
	rules, err = state.ReadAllow(pinned)
	if err != nil {
		return nil, false, false
	}
	ids, err := state.ReadAllowIDs(pinned)
	if err != nil {
		return nil, false, false
	}
	want, err := state.CompileAllowKeeping(wantRules, ids)
	if err != nil {
		return nil, false, false
	}
	have, err := readAllowEntries(a4, a6)
	if err != nil {
		return nil, false, false
	}
	return rules, maps.Equal(have.V4, want.V4) && maps.Equal(have.V6, want.V6), true
}

func readAllowEntries(a4, a6 *ebpf.Map) (state.AllowEntries, error) {
	out := state.AllowEntries{V4: map[bpf.AegisAllowKeyV4]bpf.AegisAllowValue{}, V6: map[bpf.AegisAllowKeyV6]bpf.AegisAllowValue{}}
	var k4 bpf.AegisAllowKeyV4
	var k6 bpf.AegisAllowKeyV6
	var v bpf.AegisAllowValue
	it := a4.Iterate()
	for it.Next(&k4, &v) {
		out.V4[k4] = v
	}
	if err := it.Err(); err != nil {
		return out, err
	}
	it = a6.Iterate()
	for it.Next(&k6, &v) {
		out.V6[k6] = v
	}
	return out, it.Err()
}

func formatRules(rules []state.AllowRule) string {
	s := ""
	for i, r := range rules {
		if i > 0 {
			s += " "
		}
		s += state.FormatAllowRule(r)
	}
	return s
}
