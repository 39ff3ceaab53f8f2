package loader

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/alecthomas/kong"
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// CLI is aegis-loader's command line.
type CLI struct {
	cli.Globals
	PinPath string `default:"${pin_path}" placeholder:"DIR" help:"bpffs directory holding the pinned maps and links."`

	Load   LoadCmd   `cmd:"" help:"Install the data path, or bring it up to date: create missing maps, write the config, attach, upgrade in place."`
	Unload UnloadCmd `cmd:"" help:"Detach from the given interfaces, or from all of them and remove every pin (drops all sessions)."`
	Status StatusCmd `cmd:"" help:"Show interfaces, program, map fill, config and counters."`
}

// LoadCmd is "aegis-loader load".
type LoadCmd struct {
	Iface       []string      `short:"i" default:"eth0" help:"Public interface to filter (repeatable)."`
	IP          string        `short:"c" name:"ip" default:"172.21.0.5" help:"Aegis controller's IPv4 or IPv6 address; its login port is always reachable."`
	Port        uint16        `short:"p" default:"443" help:"Controller's login port (TCP)."`
	GRPCPort    uint16        `short:"g" name:"grpc-port" default:"50001" help:"Agent gRPC port the controller connects to (TCP)."`
	RuleTimeout time.Duration `short:"r" default:"60s" help:"Default session idle timeout."`
	Mode        string        `default:"auto" enum:"auto,native,generic" help:"XDP attach mode: ${enum}."`
	MaxSessions uint32        `default:"${max_sessions}" help:"Capacity of each sessions map (IPv4 and IPv6)."`
	Allow       []string      `sep:" " placeholder:"RULE" help:"Static allow rule CIDR[,PROTO[/PORT]], PROTO tcp|udp|any (repeatable; space-separated in the environment)."`
	Monitor     bool          `help:"Monitor mode: count would-be drops as 'monitor' and pass them."`
	Group       string        `default:"aegis" help:"Group that owns the pins; the daemons run in it."`
	JSON        bool          `name:"json" help:"Print the result as JSON."`
}

// UnloadCmd is "aegis-loader unload".
type UnloadCmd struct {
	Iface []string `short:"i" placeholder:"IFACE" help:"Interface to detach (repeatable); none: detach all and remove every pin."`
}

// StatusCmd is "aegis-loader status".
type StatusCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

// Main runs aegis-loader with args and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	return MainWith(ctx, args, stdio, nil)
}

// MainWith is Main with a Loader customizer, for tests that inject faults.
func MainWith(ctx context.Context, args []string, stdio cli.IO, customize func(*Loader)) int {
	var c CLI
	return cli.Run(ctx, "aegis-loader",
		"Loads the Aegis XDP data path, pins its state under bpffs, and upgrades it in place.",
		&c, &c.Globals, args, stdio,
		kong.Vars{"pin_path": state.DefaultPinPath, "max_sessions": defaultMaxSessions()},
		kong.Bind(&c),
		kong.BindToProvider(func(log zerolog.Logger) (*Loader, error) {
			l := New(log)
			if customize != nil {
				customize(l)
			}
			return l, nil
		}),
	)
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
func (cmd *LoadCmd) Run(c *CLI, l *Loader, stdio cli.IO) error {
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
	res, err := l.Load(cfg)
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

// Run unloads.
func (cmd *UnloadCmd) Run(c *CLI, l *Loader, stdio cli.IO) error {
	detached, err := l.Unload(c.PinPath, cmd.Iface)
	if errors.Is(err, ErrNotLoadedHere) {
		fmt.Fprintf(stdio.Stdout, "not loaded: nothing pinned at %s\n", c.PinPath)
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case len(cmd.Iface) == 0:
		fmt.Fprintf(stdio.Stdout, "unloaded: detached %d interface(s), removed %s\n", len(detached), c.PinPath)
	default:
		fmt.Fprintf(stdio.Stdout, "detached: %s\n", strings.Join(detached, ","))
	}
	return nil
}

// Run prints the status.
func (cmd *StatusCmd) Run(c *CLI, l *Loader, stdio cli.IO) error {
	st, err := l.Status(c.PinPath)
	if err != nil {
		return err
	}
	if cmd.JSON {
		enc := json.NewEncoder(stdio.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
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
	fmt.Fprintln(w, "INTERFACE\tIFINDEX\tMODE\tLINK\tPROGRAM\tTAG\tBUILD")
	for _, i := range st.Interfaces {
		build := "this"
		if !i.Current {
			build = "other"
		}
		if !i.Attached {
			build = "detached"
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%d\t%d\t%s\t%s\n", i.Name, i.Ifindex, i.Mode, i.LinkID, i.ProgramID, i.Tag, build)
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
	fmt.Fprintf(w, "allow\t%s\n", strings.Join(append([]string{}, st.Allow...), " "))
	fmt.Fprintln(w, "\nVERDICT\tREASON\tPACKETS\tBYTES")
	for _, ct := range st.Counters {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\n", ct.Verdict, ct.Reason, ct.Packets, ct.Bytes)
	}
	return w.Flush()
}
