package main

import (
	"github.com/aegis-agent/aegis/internal/binaries"
	"github.com/aegis-agent/aegis/internal/cli"
)

// commands are every command of every binary, in the order of
// binaries.All and of their declaration.
func commands() ([]command, error) {
	var out []command
	for _, b := range binaries.All {
		k, err := b.Parser(cli.IO{})
		if err != nil {
			return nil, err
		}
		out = append(out, command{b.Spec.Name, b.Main, binaries.Commands(k)})
	}
	return out, nil
}
