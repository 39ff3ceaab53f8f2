package loader

import (
	"fmt"
	"github.com/aegis-agent/aegis/internal/guard"
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// Status is what aegis-loader status reports.
type Status struct {
	PinPath string `json:"pin_path"`
	// NotFiltered names every configured interface that is not filtered
	// and why, in one line; empty when all are.
	NotFiltered string `json:"not_filtered,omitempty"`
	// Filtering is the verdict on each configured interface.
	Filtering []state.Filtering `json:"filtering"`
	// LayoutVersion is the pins' layout version, BuildLayoutVersion this
	// binary's. When they differ only the interfaces are reported: the
	// maps are another release's to decode.
	LayoutVersion      uint32            `json:"layout_version"`
	BuildLayoutVersion uint32            `json:"build_layout_version"`
	Interfaces         []InterfaceStatus `json:"interfaces"`
	Maps               []MapStatus       `json:"maps"`
	Config             ConfigStatus      `json:"config"`
	Allow              []string          `json:"allow"`
	// AllowHits are the allow rules, in Allow's order, with the packets
	// each admitted.
	AllowHits []AllowHitStatus `json:"allow_hits"`
	// AllowUnnumbered counts the packets of allow rules without a counter
	// of their own (past the 255th of a family).
	AllowUnnumbered uint64          `json:"allow_unnumbered,omitempty"`
	Counters        []CounterStatus `json:"counters"`
	Guard           GuardStatus     `json:"guard"`
	// PortMarks says whether the data path trusts its port marks.
	PortMarks PortMarksStatus `json:"port_marks"`
}

// PortMarksStatus is the trust of each kind of port mark: trusted marks
// let the data path skip lookups at ports nothing of the kind is at.
type PortMarksStatus struct {
	Sessions bool `json:"sessions_trusted"`
	Flows    bool `json:"flows_trusted"`
}

// GuardStatus is the fail-closed guard (internal/guard) as read back from
// nftables.
type GuardStatus struct {
	// Present is false when the guard table does not exist.
	Present bool `json:"present"`
	// Error says why the guard could not be read; empty otherwise.
	Error string      `json:"error,omitempty"`
	State guard.State `json:"state"`
	// Dropping names the configured interfaces whose IP traffic the
	// guard drops now: not filtered, not operator-detached.
	Dropping []string `json:"dropping"`
}

// InterfaceStatus describes one pinned XDP link.
type InterfaceStatus struct {
	Name      string `json:"name"`
	Ifindex   int    `json:"ifindex"`
	Attached  bool   `json:"attached"`
	Mode      Mode   `json:"mode"`
	LinkID    uint32 `json:"link_id"`
	ProgramID uint32 `json:"program_id"`
	Tag       string `json:"tag"`
	// Current reports whether the link runs the pinned program and that
	// is this binary's build.
	Current bool `json:"current"`
	// Egress is the interface's egress link of the reply path; nil if
	// none is pinned.
	Egress *EgressStatus `json:"egress,omitempty"`
}

// MapStatus is one map's fill.
type MapStatus struct {
	Name     string `json:"name"`
	ID       uint32 `json:"id"`
	Entries  int    `json:"entries"`
	Capacity uint32 `json:"capacity"`
}

// ConfigStatus is the config map in operator units.
type ConfigStatus struct {
	Controller     string `json:"controller"`
	ControllerPort uint16 `json:"controller_port"`
	GRPCPort       uint16 `json:"grpc_port"`
	RuleTimeout    string `json:"rule_timeout"`
	Monitor        bool   `json:"monitor"`
	ReplyTracking  bool   `json:"reply_tracking"`
	FlowIdleTCP    string `json:"flow_idle_tcp"`
	FlowIdleUDP    string `json:"flow_idle_udp"`
	FlowIdleICMP   string `json:"flow_idle_icmp"`
}

// AllowHitStatus is one allow rule's hit counter.
type AllowHitStatus struct {
	Rule string `json:"rule"`
	// ID is the rule's counter within its family; 0: it has none of its
	// own and counts in AllowUnnumbered.
	ID      uint8  `json:"id"`
	Packets uint64 `json:"packets"`
}

// CounterStatus is one verdict reason's counters.
type CounterStatus struct {
	Reason  string `json:"reason"`
	Verdict string `json:"verdict"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Status reads the pinned state. Returns an error wrapping
// state.ErrNotLoaded when there is none.
func (l *Loader) Status(pinPath string) (*Status, error) {
	st := &Status{PinPath: pinPath, BuildLayoutVersion: bpf.LayoutVersion}
	st.Filtering, st.NotFiltered = state.NotFiltered(pinPath)
	st.Guard = guardStatus(pinPath, st.Filtering)
	v, _, err := state.PinnedLayoutVersion(pinPath)
	if err != nil {
		return nil, err
	}
	st.LayoutVersion = v
	if v != 0 && v != bpf.LayoutVersion {
		if err := l.linkStatus(st); err != nil {
			return nil, err
		}
		return st, nil
	}
	maps, err := state.Open(pinPath, state.OpenOptions{})
	if err != nil {
		return nil, err
	}
	defer maps.Close()
	if err := l.linkStatus(st); err != nil {
		return nil, err
	}

	for _, mp := range []struct {
		name string
		m    *ebpf.Map
	}{
		{state.MapSessionsV4, maps.SessionsV4}, {state.MapSessionsV6, maps.SessionsV6},
		{state.MapAllowV4, maps.AllowV4}, {state.MapAllowV6, maps.AllowV6},
		{state.MapFlowsV4, maps.FlowsV4}, {state.MapFlowsV6, maps.FlowsV6},
		{state.MapTombsV4, maps.TombsV4}, {state.MapTombsV6, maps.TombsV6},
	} {
		ms := MapStatus{Name: mp.name, Capacity: mp.m.MaxEntries()}
		if info, err := mp.m.Info(); err == nil {
			if id, ok := info.ID(); ok {
				ms.ID = uint32(id)
			}
		}
		if mp.m == maps.SessionsV4 || mp.m == maps.SessionsV6 {
			ms.Entries, err = state.CountEntries(mp.m)
		} else {
			ms.Entries, err = countIterate(mp.m)
		}
		if err != nil {
			return nil, err
		}
		st.Maps = append(st.Maps, ms)
	}

	if st.PortMarks.Sessions, st.PortMarks.Flows, err = state.MarksTrusted(maps.PortMarks); err != nil {
		return nil, err
	}
	cfg, err := maps.ReadConfig()
	if err != nil {
		return nil, err
	}
	st.Config = ConfigStatus{
		ControllerPort: cfg.ControllerPort, GRPCPort: cfg.GRPCPort,
		RuleTimeout: cfg.DefaultIdleTimeout.String(), Monitor: cfg.Monitor,
		ReplyTracking: !cfg.NoFlowTracking, FlowIdleTCP: cfg.FlowIdleTCP.String(),
		FlowIdleUDP: cfg.FlowIdleUDP.String(), FlowIdleICMP: cfg.FlowIdleICMP.String(),
	}
	if cfg.Controller.IsValid() {
		st.Config.Controller = cfg.Controller.String()
	}
	st.Allow, err = readAllow(maps)
	if err != nil {
		return nil, err
	}
	hits, err := state.ReadAllowHits(maps)
	if err != nil {
		return nil, err
	}
	st.AllowHits = []AllowHitStatus{}
	for _, h := range hits.Rules {
		st.AllowHits = append(st.AllowHits, AllowHitStatus{Rule: state.FormatAllowRule(h.Rule), ID: h.ID, Packets: h.Packets})
	}
	st.AllowUnnumbered = hits.Unnumbered[0] + hits.Unnumbered[1]

	counters, err := maps.ReadStats()
	if err != nil {
		return nil, err
	}
	for _, r := range state.Reasons {
		st.Counters = append(st.Counters, CounterStatus{
			Reason: r.String(), Verdict: r.Verdict(), Packets: counters[r].Packets, Bytes: counters[r].Bytes,
		})
	}
	return st, nil
}

// linkStatus fills in the interfaces: what each pinned link runs.
func (l *Loader) linkStatus(st *Status) error {
	spec, err := l.Spec()
	if err != nil {
		return err
	}
	linked, err := state.LinkedInterfaces(st.PinPath)
	if err != nil {
		return err
	}
	var pinned programStatus
	if p, err := ebpf.LoadPinnedProgram(state.ProgramPath(st.PinPath), nil); err == nil {
		if info, err := p.Info(); err == nil {
			pinned.id, _ = info.ID()
			pinned.tag = info.Tag
			pinned.current = sameBuild(spec, p)
		}
		p.Close()
	}
	for _, name := range linked {
		is, err := l.interfaceStatus(state.LinkPath(st.PinPath, name), name, pinned)
		if err != nil {
			return err
		}
		st.Interfaces = append(st.Interfaces, is)
	}
	return addEgressStatus(st, spec, st.PinPath)
}

// programStatus describes the pinned program.
type programStatus struct {
	id      ebpf.ProgramID
	tag     string
	current bool // this binary's build
}

func (l *Loader) interfaceStatus(path, name string, pinned programStatus) (InterfaceStatus, error) {
	is := InterfaceStatus{Name: name}
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return is, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return is, fmt.Errorf("inspect link %s: %w", path, err)
	}
	is.LinkID = uint32(info.ID)
	is.ProgramID = uint32(info.Program)
	if x := info.XDP(); x != nil && x.Ifindex != 0 {
		is.Ifindex = int(x.Ifindex)
		is.Attached = true
		if mode, err := l.AttachedMode(is.Ifindex); err == nil {
			is.Mode = mode
		}
		if iface, err := net.InterfaceByIndex(is.Ifindex); err == nil && iface.Name != name {
			is.Name = fmt.Sprintf("%s (now %s)", name, iface.Name)
		}
	}
	if info.Program == pinned.id {
		is.Tag = pinned.tag
		is.Current = pinned.current
	}
	return is, nil
}

func countIterate(m *ebpf.Map) (int, error) {
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// readAllow lists the allow rules as stored, one line per prefix.
func readAllow(maps *state.Maps) ([]string, error) {
	rules, err := state.ReadAllow(maps)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(rules))
	for _, r := range rules {
		out = append(out, state.FormatAllowRule(r))
	}
	return out, nil
}

func guardStatus(pinPath string, verdicts []state.Filtering) GuardStatus {
	gs, ok, err := guard.Read()
	g := GuardStatus{Present: ok, State: gs, Dropping: []string{}}
	if err != nil {
		g.Error = err.Error()
		return g
	}
	for _, f := range verdicts {
		o, err := state.Observe(pinPath, f.Interface)
		if err != nil {
			continue
		}
		ifindex := 0
		if o.Device != nil {
			ifindex = o.Device.Ifindex
		}
		if ok && gs.Drops(f.Interface.Name, ifindex) {
			g.Dropping = append(g.Dropping, f.Interface.Name)
		}
	}
	return g
}
