// Package binaries lists the Aegis binaries with their command lines, for
// what looks at all of them at once: the generated reference (docgen) and
// the checks of the environment scheme.
package binaries

import (
	"context"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/aegisctl"
	"github.com/aegis-agent/aegis/controlplane"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/loader"
	"github.com/aegis-agent/aegis/reaper"
)

// Binary is one program.
type Binary struct {
	Spec cli.Spec
	// Main runs the program as its main() does.
	Main func(context.Context, []string, cli.IO) int
	// grammar returns a new grammar struct.
	grammar func() any
}

// Parser builds the binary's parser, as Main does, writing to stdio.
func (b Binary) Parser(stdio cli.IO) (*kong.Kong, error) {
	return b.Spec.New(b.grammar(), stdio)
}

// All are the four binaries.
var All = []Binary{
	{loader.Spec(), loader.Main, func() any { return &loader.CLI{} }},
	{controlplane.Spec(), controlplane.Main, func() any { return &controlplane.CLI{} }},
	{reaper.Spec(), reaper.Main, func() any { return &reaper.CLI{} }},
	{aegisctl.Spec(), aegisctl.Main, func() any { return &aegisctl.CLI{} }},
}

// Commands are the paths of the commands a user runs: every leaf of the
// command tree, or the root of a binary without subcommands.
func Commands(k *kong.Kong) [][]string {
	var out [][]string
	var walk func(n *kong.Node, path []string)
	walk = func(n *kong.Node, path []string) {
		var children []*kong.Node
		for _, c := range n.Children {
			if c.Type == kong.CommandNode && !c.Hidden {
				children = append(children, c)
			}
		}
		if len(children) == 0 {
			out = append(out, append([]string{}, path...))
			return
		}
		for _, c := range children {
			walk(c, append(path, c.Name))
		}
	}
	walk(k.Model.Node, nil)
	return out
}
