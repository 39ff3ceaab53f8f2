// Command aegis-reaper deletes expired sessions from the Aegis data path's
// pinned sessions maps.
package main

import (
	"context"
	"os"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/reaper"
)

func main() {
	os.Exit(reaper.Main(context.Background(), os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr}))
}
