// Command aegis-loader installs, upgrades and removes the Aegis XDP data path.
package main

import (
	"context"
	"os"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/loader"
)

func main() {
	os.Exit(loader.Main(context.Background(), os.Args[1:], cli.IO{Stdout: os.Stdout, Stderr: os.Stderr}))
}
