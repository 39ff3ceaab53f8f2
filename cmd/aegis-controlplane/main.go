// Command aegis-controlplane serves the Aegis session gRPC APIs and writes
// grants into the data path's pinned maps.
package main

import (
	"context"
	"os"

	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/cli"
)

func main() {
	os.Exit(controlplane.Main(context.Background(), os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr}))
}
