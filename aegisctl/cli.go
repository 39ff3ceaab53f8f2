// Package aegisctl is the operator's tool: it talks to aegis-controlplane
// over gRPC with mutual TLS exactly as the Aegis controller does (login,
// logout, sessions, stats, watch), reads the pinned maps directly on the
// gateway (local sessions|stats), and makes the certificates (certs).
package aegisctl

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/pki"
	"github.com/aegis-agent/aegis/internal/state"
)

// CLI is aegisctl's command line.
type CLI struct {
	cli.Globals
	Profiles `embed:""`

	Login    LoginCmd    `cmd:"" help:"Grant a session, as the controller does after a user logs in."`
	Logout   LogoutCmd   `cmd:"" help:"Revoke one session, or every session of a user."`
	Sessions SessionsCmd `cmd:"" help:"List sessions (table, or --json)."`
	Stats    StatsCmd    `cmd:"" help:"Show the data path's verdict counters and map fill."`
	Watch    WatchCmd    `cmd:"" help:"Live view of counters and sessions, refreshed every --interval."`
	Observe  ObserveCmd  `cmd:"" help:"Stream the data path's sampled verdict events (table, or --json lines)."`
	Top      TopCmd      `cmd:"" help:"The sources, destinations and ports dropped most in the last --since."`
	Explain  ExplainCmd  `cmd:"" help:"Say what the data path would do with a packet and why, from the live maps, changing nothing."`
	Local    LocalCmd    `cmd:"" help:"Read the pinned maps directly (on the gateway, as root): sessions, stats."`
	Config   ConfigCmd   `cmd:"" help:"Show the connection settings (flag > AEGISCTL_* variable > profile > default) and where each comes from."`
	Certs    CertsCmd    `cmd:"" help:"The certificates of mutual TLS: CA, the agent's server certificate, client certificates."`
}

// Spec is aegisctl's command line. Only the settings read the
// environment, each its own AEGISCTL_* variable declared on the flag
// (where to connect and how, where the pins and the certificates are,
// logging); a flag that says what to do, such as a user to revoke, --force
// or --json, reads none, so that a variable left in a shell never turns
// one command into another.
func Spec() cli.Spec {
	return cli.Spec{
		Name:        "aegisctl",
		Description: "Operates an Aegis Agent: sessions, counters, certificates.",
		EnvPrefix:   "AEGISCTL",
		Vars: kong.Vars{"pin_path": state.DefaultPinPath, "server_name": pki.ServerName,
			"default_port": strconv.Itoa(DefaultPort), "config_file": DefaultConfigFile, "certs_dir": DefaultCertsDir},
	}
}

// Main runs aegisctl with args and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	var c CLI
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "AEGIS_CTL_") {
			fmt.Fprintf(stdio.Stderr, "aegisctl: %s is not read any more: rename it AEGISCTL_%s\n", name, strings.TrimPrefix(name, "AEGIS_CTL_"))
		}
	}
	profiles := &profileResolver{}
	return cli.Run(ctx, Spec(), &c, &c.Globals, args, stdio, kong.Resolvers(profiles), kong.Bind(profiles))
}
