package loader

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/alecthomas/kong"
	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// CLI is aegis-loader's command line.
type CLI struct {
	cli.Globals
	PinPath string `default:"${pin_path}" placeholder:"DIR" help:"bpffs directory holding the pinned maps and links."`

	Load    LoadCmd    `cmd:"" help:"Install the data path, or bring it up to date: create missing maps, write the config, attach, upgrade in place."`
	Unload  UnloadCmd  `cmd:"" help:"Detach from the given interfaces, or from all of them and remove every pin (drops all sessions)."`
	Status  StatusCmd  `cmd:"" help:"Show interfaces, program, map fill, config and counters. Exits 3 while a configured interface is not filtered."`
	Watch   WatchCmd   `cmd:"" help:"Run until stopped, re-attaching the pinned program to every configured interface that appears without it (re-created, renamed)."`
	Confirm ConfirmCmd `cmd:"" help:"Keep what \"load --confirm-within\" installed; without it, the previous state comes back at the deadline."`

	RollbackTimer RollbackTimerCmd `cmd:"" name:"rollback-timer" hidden:"" help:"The detached child of load --confirm-within."`
}

// WatchCmd is "aegis-loader watch".
type WatchCmd struct {
	ResyncInterval time.Duration `default:"10s" help:"Time between two full checks of every configured interface, besides the netlink events."`
	// Unguarded leaves the guard alone, so that tests can measure the
	// gap it closes. Never for production: hidden.
	Unguarded bool `hidden:"" env:"-" help:"Do not maintain the guard (tests only)."`
}

// Run watches until SIGTERM or SIGINT.
func (cmd *WatchCmd) Run(ctx context.Context, c *CLI, l *Loader) error {
	if cmd.ResyncInterval <= 0 {
		return &cli.UsageError{Err: fmt.Errorf("--resync-interval %v: must be positive", cmd.ResyncInterval)}
	}
	ctx, stop := signal.NotifyContext(ctx, unix.SIGTERM, os.Interrupt)
	defer stop()
	l.noGuard = cmd.Unguarded
	return l.NewWatcher(c.PinPath, cmd.ResyncInterval).Run(ctx)
}

// LoadCmd is "aegis-loader load".
type LoadCmd struct {
	Iface         []string      `short:"i" default:"eth0" help:"Public interface to filter (repeatable)."`
	IP            string        `short:"c" name:"ip" default:"172.21.0.5" help:"Aegis controller's IPv4 or IPv6 address; its login port is always reachable."`
	Port          uint16        `short:"p" default:"443" help:"Controller's login port (TCP)."`
	GRPCPort      uint16        `short:"g" name:"grpc-port" default:"50001" help:"Agent gRPC port the controller connects to (TCP)."`
	RuleTimeout   time.Duration `short:"r" default:"60s" help:"Default session idle timeout."`
	Mode          string        `default:"auto" enum:"auto,native,generic" help:"XDP attach mode: ${enum}."`
	MaxSessions   uint32        `default:"${max_sessions}" help:"Capacity of each sessions map (IPv4 and IPv6)."`
	Allow         []string      `sep:" " placeholder:"RULE" help:"Static allow rule CIDR[,PROTO[/PORT]], PROTO tcp|udp|any|icmp, icmp without a port (repeatable; space-separated in the environment)."`
	ReplyTracking bool          `default:"true" negatable:"" help:"Pass replies to connections the gateway and the hosts behind it open outbound, and ICMP errors about them (tcx egress, Linux 6.6)."`
	FlowIdleTCP   time.Duration `name:"flow-idle-tcp" default:"${flow_idle_tcp}" help:"How long a TCP flow opened outbound lives without a packet."`
	FlowIdleUDP   time.Duration `name:"flow-idle-udp" default:"${flow_idle_udp}" help:"How long a UDP flow opened outbound lives without a packet."`
	FlowIdleICMP  time.Duration `name:"flow-idle-icmp" default:"${flow_idle_icmp}" help:"How long an ICMP echo flow (ping) lives without a packet."`
	Monitor       bool          `help:"Monitor mode: count would-be drops as 'monitor' and pass them."`
	EventDrops    uint16        `name:"event-drop-rate" default:"100" help:"Verdict events per second per CPU for drops and monitor's would-be drops (aegisctl observe); 0: none."`
	EventPasses   uint16        `name:"event-pass-rate" default:"0" help:"Verdict events per second per CPU for passes; 0: none."`
	Group         string        `default:"aegis" help:"Group that owns the pins; the daemons run in it."`
	JSON          bool          `name:"json" env:"-" help:"Print the result as JSON."`

	DryRun            bool          `env:"-" help:"Print what the load would do (interfaces, bypasses, rules, changes, lock-out check) and change nothing."`
	ConfirmWithin     time.Duration `env:"-" placeholder:"DURATION" help:"Roll back to the previous state unless \"aegis-loader confirm\" runs within DURATION (the wait survives the session; see docs/operations.md)."`
	NoLockoutCheck    bool          `env:"-" help:"Load even if the filter would drop the SSH session this runs in (see the lock-out check in docs/operations.md)."`
	NoBuiltinDefaults bool          `env:"-" help:"Refuse to load unless the interface (-i or AEGIS_IFACE) and the controller (-c or AEGIS_IP) are given; the unit passes it."`
}

// ConfirmCmd is "aegis-loader confirm".
type ConfirmCmd struct {
	JSON bool `name:"json" env:"-" help:"Print the result as JSON: result (confirmed), pin_path."`
}

// RollbackTimerCmd is the detached child that waits for a confirmation.
type RollbackTimerCmd struct{}

// cmdline is the command line as given, to tell a flag's built-in
// default from an explicit value equal to it.
type cmdline []string

// UnloadCmd is "aegis-loader unload". Its --iface does not read
// AEGIS_IFACE: that names the interfaces to filter, and an environment
// sourced from aegis.env must not turn "remove everything" into "detach
// eth0".
type UnloadCmd struct {
	Iface []string `short:"i" placeholder:"IFACE" env:"-" help:"Interface to detach (repeatable); none: detach all and remove every pin."`
	JSON  bool     `name:"json" env:"-" help:"Print the result as JSON: result (unloaded, detached or not_loaded), pin_path, detached (interfaces)."`
}

// Results of unload and confirm, in their --json.
const (
	// ResultUnloaded: every interface detached and every pin removed.
	ResultUnloaded = "unloaded"
	// ResultDetached: the named interfaces detached, the pins kept.
	ResultDetached = "detached"
	// ResultNotLoaded: nothing was pinned; nothing changed.
	ResultNotLoaded = "not_loaded"
	// ResultConfirmed: the load waiting for confirmation stays.
	ResultConfirmed = "confirmed"
)

// CommandResult is what unload --json and confirm --json print.
type CommandResult struct {
	Result  string `json:"result"`
	PinPath string `json:"pin_path"`
	// Detached lists the interfaces unload detached (unload only).
	Detached []string `json:"detached,omitempty"`
}

// StatusCmd is "aegis-loader status".
type StatusCmd struct {
	JSON bool `name:"json" env:"-" help:"Print JSON."`
}

// Spec is aegis-loader's command line: every flag reads AEGIS_<FLAG>,
// except those of one invocation (--json, unload --iface).
func Spec() cli.Spec {
	return cli.Spec{
		Name:        "aegis-loader",
		Description: "Loads the Aegis XDP data path, pins its state under bpffs, and upgrades it in place.",
		EnvPrefix:   "AEGIS",
		EveryFlag:   true,
		Vars: kong.Vars{
			"pin_path": state.DefaultPinPath, "max_sessions": defaultMaxSessions(),
			"flow_idle_tcp": shortDuration(state.DefaultFlowIdleTCP), "flow_idle_udp": shortDuration(state.DefaultFlowIdleUDP),
			"flow_idle_icmp": shortDuration(state.DefaultFlowIdleICMP),
		},
	}
}

// Main runs aegis-loader with args and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	return MainWith(ctx, args, stdio, nil)
}

// MainWith is Main with a Loader customizer, for tests that inject faults.
func MainWith(ctx context.Context, args []string, stdio cli.IO, customize func(*Loader)) int {
	var c CLI
	return cli.Run(ctx, Spec(), &c, &c.Globals, args, stdio,
		kong.Bind(&c, cmdline(args)),
		kong.BindToProvider(func(log zerolog.Logger) (*Loader, error) {
			l := New(log)
			if customize != nil {
				customize(l)
			}
			return l, nil
		}),
	)
}

// shortDuration prints d as an operator writes it: 6h, not 6h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// defaultMaxSessions is the sessions maps' capacity in the object, so that
// the flag's default is the C program's.
func defaultMaxSessions() string {
	spec, err := state.Spec()
	if err != nil {
		return "0" // not for a build whose tests passed: they parse the same object
	}
	return strconv.FormatUint(uint64(spec.Maps[state.MapSessionsV4].MaxEntries), 10)
}

// Run loads.
func (cmd *LoadCmd) Run(c *CLI, l *Loader, stdio cli.IO, args cmdline) error {
	cfg := Config{
		PinPath:        c.PinPath,
		Interfaces:     cmd.Iface,
		ControllerPort: cmd.Port,
		GRPCPort:       cmd.GRPCPort,
		RuleTimeout:    cmd.RuleTimeout,
		Mode:           Mode(cmd.Mode),
		MaxSessions:    cmd.MaxSessions,
		Monitor:        cmd.Monitor,
		Group:          cmd.Group,

		NoReplyTracking: !cmd.ReplyTracking,
		FlowIdleTCP:     cmd.FlowIdleTCP,
		FlowIdleUDP:     cmd.FlowIdleUDP,
		FlowIdleICMP:    cmd.FlowIdleICMP,
		EventDropRate:   cmd.EventDrops,
		NoDropEvents:    cmd.EventDrops == 0,
		EventPassRate:   cmd.EventPasses,
	}
	if cmd.IP != "" {
		a, err := netip.ParseAddr(cmd.IP)
		if err != nil {
			return &cli.UsageError{Err: fmt.Errorf("--ip %q: %w: not an IPv4 or IPv6 address", cmd.IP, ErrInvalid)}
		}
		cfg.Controller = a.Unmap()
	}
	for _, s := range cmd.Allow {
		if strings.TrimSpace(s) == "" {
			continue
		}
		r, err := state.ParseAllowRule(s)
		if err != nil {
			return &cli.UsageError{Err: err}
		}
		cfg.Allow = append(cfg.Allow, r)
	}
	cfg.NoLockoutCheck = cmd.NoLockoutCheck
	if err := cmd.checkDefaults(l, args); err != nil {
		return err
	}
	if cmd.DryRun {
		return dryRun(l, cfg, cmd.builtinNames(args), cmd.JSON, stdio)
	}
	var res *Result
	var err error
	if cmd.ConfirmWithin > 0 {
		// With --json, stdout is the result alone.
		out := stdio.Stdout
		if cmd.JSON {
			out = stdio.Stderr
		}
		res, err = confirmed(l, cfg, cmd.ConfirmWithin, c, out)
	} else {
		res, err = l.Load(cfg)
	}
	if err != nil {
		return err
	}
	if cmd.JSON {
		return json.NewEncoder(stdio.Stdout).Encode(res)
	}
	if !res.Changed() {
		fmt.Fprintf(stdio.Stdout, "already loaded: %s is up to date\n", c.PinPath)
		return nil
	}
	var parts []string
	for _, p := range []struct {
		what  string
		items []string
	}{
		{"created maps", res.CreatedMaps}, {"migrated maps", res.MigratedMaps}, {"attached", res.Attached},
		{"upgraded", res.Upgraded}, {"reattached", res.Reattached},
		{"attached egress", res.EgressAttached}, {"upgraded egress", res.EgressUpgraded},
		{"detached egress", res.EgressDetached},
		{"no longer configured", res.Unconfigured},
	} {
		if len(p.items) > 0 {
			parts = append(parts, p.what+" "+strings.Join(p.items, ","))
		}
	}
	if res.ConfigWritten {
		parts = append(parts, "wrote config")
	}
	if res.AllowWritten {
		parts = append(parts, "wrote allow rules")
	}
	fmt.Fprintf(stdio.Stdout, "loaded: %s\n", strings.Join(parts, "; "))
	return nil
}

// Run confirms.
func (cmd *ConfirmCmd) Run(c *CLI, stdio cli.IO) error {
	if err := Confirm(c.PinPath); err != nil {
		return err
	}
	if cmd.JSON {
		return json.NewEncoder(stdio.Stdout).Encode(CommandResult{Result: ResultConfirmed, PinPath: c.PinPath})
	}
	fmt.Fprintf(stdio.Stdout, "confirmed: %s stays as loaded\n", c.PinPath)
	return nil
}

// Run waits for the confirmation, and rolls back without one.
func (cmd *RollbackTimerCmd) Run(c *CLI, l *Loader) error {
	var prog *ebpf.Program
	if p, err := ebpf.NewProgramFromFD(3); err == nil {
		prog = p
		defer prog.Close()
	}
	return l.WaitAndRollback(c.PinPath, prog)
}

// Run unloads.
func (cmd *UnloadCmd) Run(c *CLI, l *Loader, stdio cli.IO) error {
	detached, err := l.Unload(c.PinPath, cmd.Iface)
	res := CommandResult{Result: ResultUnloaded, PinPath: c.PinPath, Detached: detached}
	switch {
	case errors.Is(err, ErrNotLoadedHere):
		res.Result = ResultNotLoaded
	case err != nil:
		return err
	case len(cmd.Iface) > 0:
		res.Result = ResultDetached
	}
	if cmd.JSON {
		return json.NewEncoder(stdio.Stdout).Encode(res)
	}
	switch {
	case res.Result == ResultNotLoaded:
		fmt.Fprintf(stdio.Stdout, "not loaded: nothing pinned at %s\n", c.PinPath)
	case len(cmd.Iface) == 0:
		fmt.Fprintf(stdio.Stdout, "unloaded: detached %d interface(s), removed %s\n", len(detached), c.PinPath)
	default:
		fmt.Fprintf(stdio.Stdout, "detached: %s\n", strings.Join(detached, ","))
	}
	return nil
}

// ExitNotFiltered is aegis-loader status's exit code when a configured
// interface is not filtered: the data path is loaded but the gateway is
// open somewhere. 1 stays "status could not be read".
const ExitNotFiltered = 3

// Run prints the status. While a configured interface is not filtered
// the first line says which and why, and it exits ExitNotFiltered.
func (cmd *StatusCmd) Run(c *CLI, l *Loader, stdio cli.IO) error {
	st, err := l.Status(c.PinPath)
	if err != nil {
		return err
	}
	var result error
	if st.NotFiltered != "" {
		result = &cli.ExitError{Code: ExitNotFiltered}
	}
	if cmd.JSON {
		enc := json.NewEncoder(stdio.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
		return result
	}
	if st.NotFiltered != "" {
		fmt.Fprintf(stdio.Stdout, "NOT FILTERED: %s\n", st.NotFiltered)
	}
	w := tabwriter.NewWriter(stdio.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "pin path\t%s\n", st.PinPath)
	switch v, b := st.LayoutVersion, st.BuildLayoutVersion; {
	case v == b, v == 0:
		fmt.Fprintf(w, "layout version\t%d\n\n", b)
	case v < b:
		fmt.Fprintf(w, "layout version\t%d: pins from an older release (this build writes %d); \"aegis-loader load\" upgrades them in place\n\n", v, b)
	default:
		fmt.Fprintf(w, "layout version\t%d: pins from a newer release (this build writes %d); use that release's aegis-loader\n\n", v, b)
	}
	fmt.Fprintln(w, "CONFIGURED\tMODE\tGUARD\tFILTERED")
	for _, f := range st.Filtering {
		verdict := "yes"
		if !f.Filtered {
			verdict = fmt.Sprintf("no: %s (%s)", f.Reason, f.Detail)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", f.Interface.Name, f.Interface.Mode, guardColumn(st.Guard, f), verdict)
	}
	if st.Guard.Error != "" {
		fmt.Fprintf(w, "guard\tunreadable: %s\n", st.Guard.Error)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "INTERFACE\tIFINDEX\tMODE\tLINK\tPROGRAM\tTAG\tBUILD\tEGRESS")
	for _, i := range st.Interfaces {
		build := "this"
		if !i.Current {
			build = "other"
		}
		if !i.Attached {
			build = "detached"
		}
		egress := "none"
		switch e := i.Egress; {
		case e == nil:
		case !e.Attached:
			egress = "detached"
		case e.Current:
			egress = fmt.Sprintf("link %d program %d, this build", e.LinkID, e.ProgramID)
		default:
			egress = fmt.Sprintf("link %d program %d, other build", e.LinkID, e.ProgramID)
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s\n", i.Name, i.Ifindex, i.Mode, i.LinkID, i.ProgramID, i.Tag, build, egress)
	}
	if v := st.LayoutVersion; v != 0 && v != st.BuildLayoutVersion {
		return w.Flush() // the maps are another release's to decode
	}
	fmt.Fprintln(w, "\nMAP\tID\tENTRIES\tCAPACITY\tFILL")
	for _, m := range st.Maps {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%.1f%%\n", m.Name, m.ID, m.Entries, m.Capacity, 100*float64(m.Entries)/float64(max(m.Capacity, 1)))
	}
	ctl := st.Config.Controller
	if ctl == "" {
		ctl = "none"
	}
	fmt.Fprintf(w, "\ncontroller\t%s port %d\n", ctl, st.Config.ControllerPort)
	fmt.Fprintf(w, "agent grpc port\t%d\n", st.Config.GRPCPort)
	fmt.Fprintf(w, "rule timeout\t%s\n", st.Config.RuleTimeout)
	fmt.Fprintf(w, "monitor\t%v\n", st.Config.Monitor)
	if st.Config.ReplyTracking {
		fmt.Fprintf(w, "reply tracking\ton: flows idle out after tcp %s, udp %s, icmp %s\n",
			st.Config.FlowIdleTCP, st.Config.FlowIdleUDP, st.Config.FlowIdleICMP)
	} else {
		fmt.Fprintf(w, "reply tracking\toff\n")
	}
	trust := func(b bool, unset string) string {
		if b {
			return "trusted"
		}
		return "not trusted (" + unset + ")"
	}
	fmt.Fprintf(w, "port marks\tsessions %s, flows %s\n", trust(st.PortMarks.Sessions, "until the control plane marks them"),
		trust(st.PortMarks.Flows, "until the next load"))
	fmt.Fprintf(w, "allow\t%s\n", strings.Join(append([]string{}, st.Allow...), " "))
	if len(st.AllowHits) > 0 {
		fmt.Fprintln(w, "\nALLOW RULE\tID\tHITS")
		for _, h := range st.AllowHits {
			id, hits := fmt.Sprint(h.ID), fmt.Sprint(h.Packets)
			if h.ID == 0 {
				id, hits = "-", "-"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\n", h.Rule, id, hits)
		}
		if st.AllowUnnumbered > 0 {
			fmt.Fprintf(w, "(rules without a counter)\t0\t%d\n", st.AllowUnnumbered)
		}
	}
	fmt.Fprintln(w, "\nVERDICT\tREASON\tPACKETS\tBYTES")
	for _, ct := range st.Counters {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\n", ct.Verdict, ct.Reason, ct.Packets, ct.Bytes)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	return result
}

// guardColumn says whether the guard drops an interface's IP traffic now.
func guardColumn(g GuardStatus, f state.Filtering) string {
	switch {
	case slices.Contains(g.Dropping, f.Interface.Name):
		return "dropping"
	case !g.Present || f.Interface.OperatorDetached:
		return "none"
	}
	return "armed"
}
