package main

import (
	"fmt"

	"github.com/aegis-agent/aegis/internal/binaries"
	"github.com/aegis-agent/aegis/internal/cli"
)

// manNotes are each binary's man page section and what its page says
// beyond the model.
var manNotes = map[string][2]string{
	"aegis-loader": {"8", "The data path lives in the kernel, pinned under the pin directory, not in a process: " +
		"stopping aegis-loader.service leaves the filter attached; only \"aegis-loader unload\" detaches it."},
	"aegis-controlplane": {"8", "Run by aegis-controlplane.service as user aegis with CAP_BPF only, socket-activated by " +
		"aegis-controlplane.socket; it reads its TLS material through systemd credentials."},
	"aegis-reaper": {"8", "Run by aegis-reaper.service as user aegis with CAP_BPF only. The data path already refuses " +
		"expired sessions; the reaper reclaims their space."},
	"aegisctl": {"1", "The remote commands talk to aegis-controlplane over gRPC with mutual TLS, as the Aegis " +
		"controller does; \"aegisctl local\" reads the pinned maps directly and needs root on the gateway."},
}

// commands are every command of every binary, in the order of
// binaries.All and of their declaration.
var commands = mustCommands()

func mustCommands() []command {
	var out []command
	for _, b := range binaries.All {
		k, err := b.Parser(cli.IO{})
		if err != nil {
			panic(fmt.Sprintf("docgen: %s: %v", b.Spec.Name, err))
		}
		n, ok := manNotes[b.Spec.Name]
		if !ok {
			panic("docgen: no man page section for " + b.Spec.Name)
		}
		out = append(out, command{b.Spec.Name, b.Main, binaries.Commands(k), n[0], n[1]})
	}
	return out
}
