package reaper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/alecthomas/kong"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// CLI is aegis-reaper's command line.
type CLI struct {
	cli.Globals
	PinPath         string        `default:"${pin_path}" placeholder:"DIR" help:"bpffs directory holding the pinned maps."`
	CleanupInterval time.Duration `default:"30s" help:"Time between two sweeps."`
	Once            bool          `help:"Sweep once and exit: 0 when the sweep completed, 1 when the maps could not be opened or the sweep failed."`
	// The control plane has a flag of the same name, and both daemons read
	// one environment file: each gets its own variable.
	MetricsAddress string `env:"AEGIS_REAPER_METRICS_ADDRESS" placeholder:"HOST:PORT" help:"Serve Prometheus metrics on http://HOST:PORT/metrics: the data path's counters, map fill and monitor mode, and the sweeps; off when empty. Ignored with --once."`
}

// Main runs aegis-reaper with args and returns its exit code.
func Main(ctx context.Context, args []string, stdio cli.IO) int {
	var c CLI
	return cli.Run(ctx, Spec(), &c, &c.Globals, args, stdio, kong.Bind(&c))
}

// Spec is aegis-reaper's command line: every flag reads AEGIS_<FLAG>, or
// AEGIS_REAPER_<FLAG> where the control plane has a flag of the same name.
func Spec() cli.Spec {
	return cli.Spec{
		Name:        "aegis-reaper",
		Description: "Deletes expired sessions from the pinned sessions maps of the Aegis data path.",
		EnvPrefix:   "AEGIS",
		EveryFlag:   true,
		Vars:        kong.Vars{"pin_path": state.DefaultPinPath},
	}
}

// Run sweeps once or runs the daemon. SIGTERM and SIGINT stop it between
// two batches of a sweep.
func (c *CLI) Run(ctx context.Context, log zerolog.Logger) error {
	if c.CleanupInterval <= 0 {
		return &cli.UsageError{Err: fmt.Errorf("--cleanup-interval %s: must be positive", c.CleanupInterval)}
	}
	ctx, stop := signal.NotifyContext(ctx, unix.SIGTERM, os.Interrupt)
	defer stop()
	r := New(c.PinPath, c.CleanupInterval, log)
	if !c.Once {
		return r.Run(ctx, c.MetricsAddress)
	}
	err := r.Once(ctx)
	if errors.Is(err, context.Canceled) {
		return errors.New("interrupted: the sweep did not finish")
	}
	return err
}
