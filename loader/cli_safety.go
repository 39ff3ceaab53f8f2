package loader

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/aegis-agent/aegis/internal/cli"
)

// builtinFlag is a load flag whose built-in default names this
// particular network (the original agent's eth0 and 172.21.0.5): right
// for interactive use on that network, a surprise anywhere else.
type builtinFlag struct {
	long, short, env, value string
}

// builtinDefaults lists the flags that take their built-in default: not on
// the command line and not in the environment.
func (cmd *LoadCmd) builtinDefaults(args cmdline) []builtinFlag {
	var out []builtinFlag
	for _, f := range []builtinFlag{
		{"--iface", "-i", "AEGIS_IFACE", strings.Join(cmd.Iface, ",")},
		{"--ip", "-c", "AEGIS_IP", cmd.IP},
	} {
		if os.Getenv(f.env) != "" {
			continue
		}
		given := false
		for _, a := range args {
			if a == "--" {
				break
			}
			given = given || a == f.long || strings.HasPrefix(a, f.long+"=") ||
				(strings.HasPrefix(a, f.short) && !strings.HasPrefix(a, "--"))
		}
		if !given {
			out = append(out, f)
		}
	}
	return out
}

// checkDefaults warns about, or with --no-builtin-defaults refuses, a load
// that filters the built-in interface or trusts the built-in controller.
func (cmd *LoadCmd) checkDefaults(l *Loader, args cmdline) error {
	fs := cmd.builtinDefaults(args)
	if len(fs) == 0 {
		return nil
	}
	var names []string
	for _, f := range fs {
		names = append(names, fmt.Sprintf("%s %s (%s)", f.long, f.value, f.env))
	}
	if cmd.NoBuiltinDefaults {
		return &cli.ExitError{Code: cli.ExitConfig, Err: fmt.Errorf("%w: refusing the built-in %s: set the public interface and the controller's address in /etc/aegis/aegis.env (AEGIS_IFACE=, AEGIS_IP=) or pass -i and -c",
			ErrInvalid, strings.Join(names, " and "))}
	}
	if !cmd.DryRun {
		l.Log.Warn().Strs("flags", names).Msg("loading with built-in defaults: pass -i and -c (or AEGIS_IFACE, AEGIS_IP) for this gateway's interface and controller")
	}
	return nil
}

func (cmd *LoadCmd) builtinNames(args cmdline) []string {
	var out []string
	for _, f := range cmd.builtinDefaults(args) {
		out = append(out, fmt.Sprintf("%s %s", f.long, f.value))
	}
	return out
}

// confirmed runs a load that rolls back unless confirmed within d. Its
// lines for the operator go to out.
func confirmed(l *Loader, cfg Config, d time.Duration, c *CLI, out io.Writer) (*Result, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find aegis-loader's executable for the rollback timer: %w", err)
	}
	args := []string{"rollback-timer", "--log-format", "json", "--log-level", c.LogLevel}
	res, err := l.LoadConfirmed(cfg, d, exe, args, func(_ *Result, logPath string) {
		fmt.Fprintf(out, "loaded; run \"aegis-loader confirm --pin-path %s\" within %s from a NEW session, or the previous state comes back (log: %s)\n",
			cfg.PinPath, d, logPath)
	})
	if err != nil {
		return res, err
	}
	if res.Changed() {
		fmt.Fprintln(out, "confirmed")
	}
	return res, nil
}

// dryRun prints the plan of a load.
func dryRun(l *Loader, cfg Config, builtin []string, asJSON bool, stdio cli.IO) error {
	p, err := l.Plan(cfg)
	if err != nil {
		return err
	}
	p.BuiltinDefaults = builtin
	if asJSON {
		enc := json.NewEncoder(stdio.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	w := tabwriter.NewWriter(stdio.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "dry run: nothing changed\n\npin path\t%s\n", p.PinPath)
	switch p.Change {
	case "no change":
		fmt.Fprintf(w, "program\tno change (this build, tag %s, is running)\n", p.Tag)
	case "upgrade":
		fmt.Fprintf(w, "program\tupgrade from tag %s to this build\n", p.PinnedTag)
	default:
		fmt.Fprintf(w, "program\t%s\n", p.Change)
	}
	fmt.Fprintf(w, "mode\t%s\nmonitor\t%v\nrule timeout\t%s\nmax sessions\t%d\n", p.Mode, p.Monitor, p.RuleTimeout, p.MaxSessions)
	fmt.Fprintf(w, "bypasses\t%s\n", strings.Join(p.Bypasses, "; "))
	allow := strings.Join(p.Allow, " ")
	if allow == "" {
		allow = "none"
	}
	fmt.Fprintf(w, "allow\t%s\n", allow)
	fmt.Fprintln(w, "\nINTERFACE\tEXISTS\tXDP NOW\tACTION")
	for _, i := range p.Interfaces {
		now := "none"
		switch {
		case i.XDP.Attached && i.XDP.LinksUnknown:
			now = fmt.Sprintf("program %d (%s)", i.XDP.ProgramID, i.XDP.Mode)
		case i.XDP.Attached && i.XDP.LinkID != 0:
			now = fmt.Sprintf("program %d via link %d (%s)", i.XDP.ProgramID, i.XDP.LinkID, i.XDP.Mode)
		case i.XDP.Attached:
			now = fmt.Sprintf("program %d via netlink (%s)", i.XDP.ProgramID, i.XDP.Mode)
		}
		fmt.Fprintf(w, "%s\t%v\t%s\t%s\n", i.Name, i.Exists, now, i.Action)
	}
	if len(p.ConfigChanges) > 0 {
		fmt.Fprintln(w, "\nCONFIG\tFROM\tTO")
		for _, c := range p.ConfigChanges {
			fmt.Fprintf(w, "%s\t%s\t%s\n", c.Field, c.From, c.To)
		}
	}
	if len(p.Lockout) > 0 {
		fmt.Fprintln(w, "\nLOCK-OUT CHECK\tIFACE\tVERDICT\tFINDING")
		for _, f := range p.Lockout {
			fmt.Fprintf(w, "%s\t%s\t%s (%s)\t%s\n", f.Severity, f.Iface, f.Verdict, f.Reason, f.Message)
		}
	} else {
		fmt.Fprintln(w, "\nlock-out check\tno SSH session or default route through these interfaces")
	}
	if len(p.BuiltinDefaults) > 0 {
		fmt.Fprintf(w, "\nbuilt-in defaults\t%s (the original agent's network: check they are this gateway's)\n", strings.Join(p.BuiltinDefaults, ", "))
	}
	if p.Refused != "" {
		fmt.Fprintf(w, "\nthe load would be REFUSED: %s\n", p.Refused)
	}
	return w.Flush()
}
