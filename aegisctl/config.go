package aegisctl

import (
	"fmt"
	"io"
	"os"
	"slices"
	"text/tabwriter"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/internal/cli"
)

// ConfigCmd is "aegisctl config": the connection settings a command would
// use, and where each comes from. It calls nothing.
type ConfigCmd struct {
	Conn `embed:""`
	JSON bool `name:"json" help:"Print JSON: settings (name, value, from: flag|environment|profile|default, and variable, or profile and profile_file) and dials."`
}

// Setting is one connection setting as "aegisctl config --json" prints it.
type Setting struct {
	// Name is the flag's, without the dashes.
	Name string `json:"name"`
	// Value is as the flag would take it: "10s", "true".
	Value string `json:"value"`
	// From is SourceFlag, SourceEnvironment, SourceProfile or
	// SourceDefault.
	From string `json:"from"`
	// Variable is the AEGISCTL_* variable that set it (From environment).
	Variable string `json:"variable,omitempty"`
	// Profile and ProfileFile are the profile that set it and its file
	// (From profile).
	Profile     string `json:"profile,omitempty"`
	ProfileFile string `json:"profile_file,omitempty"`
}

// Where a setting comes from, in order of precedence.
const (
	SourceFlag        = "flag"
	SourceEnvironment = "environment"
	SourceProfile     = "profile"
	SourceDefault     = "default"
)

// Settings is what "aegisctl config --json" prints.
type Settings struct {
	Settings []Setting `json:"settings"`
	// Dials is the address a command would dial, HOST:PORT.
	Dials string `json:"dials"`
}

// Run prints the settings.
func (cmd *ConfigCmd) Run(kctx *kong.Context, r *profileResolver, stdio cli.IO) error {
	onCommandLine := map[*kong.Flag]bool{}
	for _, p := range kctx.Path {
		if p.Flag != nil && !p.Resolved {
			onCommandLine[p.Flag] = true
		}
	}
	// The profile's own flags (aegisctl's), then the command's settings.
	var flags []*kong.Flag
	for _, f := range kctx.Model.Node.Flags {
		if slices.Contains([]string{"config", "profile"}, f.Name) {
			flags = append(flags, f)
		}
	}
	for _, f := range kctx.Selected().Flags {
		if len(f.Envs) > 0 {
			flags = append(flags, f)
		}
	}
	var out Settings
	for _, f := range flags {
		s := Setting{Name: f.Name, Value: fmt.Sprint(kctx.FlagValue(f)), From: SourceDefault}
		switch {
		case onCommandLine[f]:
			s.From = SourceFlag
		case envSet(f):
			s.From = SourceEnvironment
			for _, e := range f.Envs {
				if _, ok := os.LookupEnv(e); ok {
					s.Variable = e
					break
				}
			}
		case r.resolved[f.Name]:
			s.From, s.Profile, s.ProfileFile = SourceProfile, r.name, r.file
		}
		out.Settings = append(out.Settings, s)
	}
	addr, err := target(cmd.Address)
	if err != nil {
		return err
	}
	out.Dials = addr
	if cmd.JSON {
		return writeJSON(stdio.Stdout, out)
	}
	return WriteSettings(stdio.Stdout, out)
}

// WriteSettings prints the settings as a table, then the address dialed.
func WriteSettings(w io.Writer, s Settings) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SETTING\tVALUE\tFROM")
	for _, st := range s.Settings {
		from := st.From
		switch st.From {
		case SourceEnvironment:
			from = "$" + st.Variable
		case SourceProfile:
			from = fmt.Sprintf("profile %s of %s", st.Profile, st.ProfileFile)
		}
		fmt.Fprintf(tw, "--%s\t%s\t%s\n", st.Name, st.Value, from)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "dials %s\n", s.Dials)
	return err
}

func envSet(f *kong.Flag) bool {
	for _, e := range f.Envs {
		if _, ok := os.LookupEnv(e); ok {
			return true
		}
	}
	return false
}
