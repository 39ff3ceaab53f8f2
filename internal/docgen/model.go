package main

import (
	"strings"

	"github.com/alecthomas/kong"
)

// nodes returns n and its visible subcommands, depth first, in the order
// of the grammar.
func nodes(n *kong.Node) []*kong.Node {
	out := []*kong.Node{n}
	for _, c := range n.Children {
		if !c.Hidden && c.Type == kong.CommandNode {
			out = append(out, nodes(c)...)
		}
	}
	return out
}

// subcommands returns n's visible direct subcommands.
func subcommands(n *kong.Node) []*kong.Node {
	var out []*kong.Node
	for _, c := range n.Children {
		if !c.Hidden && c.Type == kong.CommandNode {
			out = append(out, c)
		}
	}
	return out
}

// path is n's command path below the application: "" for the
// application, "local sessions" for aegisctl local sessions.
func path(n *kong.Node) string {
	var parts []string
	for ; n != nil && n.Type != kong.ApplicationNode; n = n.Parent {
		parts = append([]string{n.Name}, parts...)
	}
	return strings.Join(parts, " ")
}

// visibleFlags returns n's own flags but the hidden ones.
func visibleFlags(n *kong.Node) []*kong.Flag {
	var out []*kong.Flag
	for _, f := range n.Flags {
		if !f.Hidden {
			out = append(out, f)
		}
	}
	return out
}

// inheritedFlags returns the flags valid after n on the command line:
// its own and its ancestors' (kong accepts a parent's flag anywhere after
// the parent).
func inheritedFlags(n *kong.Node) []*kong.Flag {
	var out []*kong.Flag
	for _, group := range n.AllFlags(true) {
		out = append(out, group...)
	}
	return out
}

// takesValue reports whether f needs an argument.
func takesValue(f *kong.Flag) bool { return !f.IsBool() && !f.IsCounter() }

// valueKind says what a flag's argument is, for the completions.
type valueKind int

const (
	valueNone valueKind = iota // a boolean flag
	valueWord                  // anything; nothing to offer
	valueEnum                  // one of f.Enum
	valueFile
	valueDir
	valueIface // a network interface
)

func kindOf(f *kong.Flag) valueKind {
	switch {
	case !takesValue(f):
		return valueNone
	case f.Enum != "":
		return valueEnum
	case f.PlaceHolder == "FILE":
		return valueFile
	case f.PlaceHolder == "DIR":
		return valueDir
	case f.Name == "iface" || f.PlaceHolder == "IFACE":
		return valueIface
	}
	return valueWord
}

// enumValues returns the choices of an enum flag.
func enumValues(f *kong.Flag) []string {
	var out []string
	for _, v := range strings.Split(f.Enum, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// firstSentence shortens a help text for the completion menus.
func firstSentence(s string) string {
	if i := strings.Index(s, ". "); i >= 0 {
		s = s[:i]
	}
	return strings.TrimSuffix(strings.TrimSpace(s), ".")
}
