package aegisctl

import (
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/internal/cli"
)

// ConfigCmd is "aegisctl config": the connection settings a command would
// use, and where each comes from. It calls nothing.
type ConfigCmd struct {
	Conn `embed:""`
}

// Run prints the settings.
func (cmd *ConfigCmd) Run(kctx *kong.Context, r *profileResolver, stdio cli.IO) error {
	node := kctx.Selected()
	onCommandLine := map[*kong.Flag]bool{}
	for _, p := range kctx.Path {
		if p.Flag != nil && !p.Resolved {
			onCommandLine[p.Flag] = true
		}
	}
	w := tabwriter.NewWriter(stdio.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "SETTING\tVALUE\tFROM")
	for _, f := range node.Flags {
		if len(f.Envs) == 0 {
			continue
		}
		from := "default"
		switch {
		case onCommandLine[f]:
			from = "flag"
		case envSet(f):
			from = "environment"
			for _, e := range f.Envs {
				if _, ok := os.LookupEnv(e); ok {
					from = "$" + e
					break
				}
			}
		case r.resolved[f.Name]:
			from = fmt.Sprintf("profile %s of %s", r.name, r.file)
		}
		fmt.Fprintf(w, "--%s\t%v\t%s\n", f.Name, kctx.FlagValue(f), from)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	addr, err := target(cmd.Address)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdio.Stdout, "dials %s\n", addr)
	return nil
}

func envSet(f *kong.Flag) bool {
	for _, e := range f.Envs {
		if _, ok := os.LookupEnv(e); ok {
			return true
		}
	}
	return false
}
