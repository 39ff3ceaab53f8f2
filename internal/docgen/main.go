// Command docgen writes what documents the commands from the commands
// themselves, so that none of it can drift from the binaries: the
// configuration reference of docs/operations.md from their --help output
// ("make docs"; CI checks that the committed file is current), and from
// their kong models the man pages ("make man") and the bash, zsh and fish
// completions ("make completions"), which are build outputs.
//
//	docgen [-man DIR] [-completions DIR] [-version V] [DOC]
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/aegis-agent/aegis/internal/cli"
)

const (
	begin = "<!-- BEGIN GENERATED REFERENCE: make docs -->"
	end   = "<!-- END GENERATED REFERENCE -->"
)

type command struct {
	name string
	main func(context.Context, []string, cli.IO) int
	subs [][]string // subcommands to document; nil entry: the root
	// section of the man page, and what it says beyond the model.
	section, notes string
}

func main() {
	// kong wraps help to $COLUMNS; the reference must not depend on the
	// terminal it was generated in.
	os.Unsetenv("COLUMNS")
	manDir := flag.String("man", "", "write one roff man page per command into `DIR`")
	complDir := flag.String("completions", "", "write bash, zsh and fish completions into `DIR`/{bash,zsh,fish}")
	version := flag.String("version", cli.Version(), "version named in the man pages")
	flag.Parse()
	var err error
	switch {
	case *manDir != "" || *complDir != "":
		if *manDir != "" {
			err = writeMan(*manDir, *version)
		}
		if err == nil && *complDir != "" {
			err = writeCompletions(*complDir)
		}
		if err == nil && flag.NArg() > 0 {
			err = run(flag.Arg(0))
		}
	default:
		path := "docs/operations.md"
		if flag.NArg() > 0 {
			path = flag.Arg(0)
		}
		err = run(path)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "docgen:", err)
		os.Exit(1)
	}
}

// model returns the kong model of c as its Main builds it.
func (c command) model() (*kong.Application, error) {
	var app *kong.Application
	ctx := cli.WithModel(context.Background(), func(k *kong.Kong) { app = k.Model })
	var errb bytes.Buffer
	if code := c.main(ctx, nil, cli.IO{Stdout: &errb, Stderr: &errb}); code != 0 || app == nil {
		return nil, fmt.Errorf("%s: no kong model (exit %d): %s", c.name, code, errb.String())
	}
	return app, nil
}

func run(path string) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	i, j := bytes.Index(doc, []byte(begin)), bytes.Index(doc, []byte(end))
	if i < 0 || j < i {
		return fmt.Errorf("%s lacks the %q and %q markers", path, begin, end)
	}
	var ref strings.Builder
	ref.WriteString(begin + "\n")
	for _, c := range commands {
		for _, sub := range c.subs {
			var out, errb bytes.Buffer
			args := append(append([]string{}, sub...), "--help")
			if code := c.main(context.Background(), args, cli.IO{Stdout: &out, Stderr: &errb}); code != 0 {
				return fmt.Errorf("%s %s: exit %d: %s", c.name, strings.Join(args, " "), code, errb.String())
			}
			title := strings.TrimSpace(c.name + " " + strings.Join(sub, " "))
			fmt.Fprintf(&ref, "\n#### `%s`\n\n```text\n%s```\n", title, out.String())
		}
	}
	ref.WriteString("\n")
	updated := append(append(append([]byte{}, doc[:i]...), ref.String()...), doc[j:]...)
	return os.WriteFile(path, updated, 0o644)
}
