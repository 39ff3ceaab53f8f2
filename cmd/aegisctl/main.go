// Command aegisctl operates an Aegis Agent: sessions, counters, certificates.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := aegisctl.Main(ctx, os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr})
	stop()
	os.Exit(code)
}
