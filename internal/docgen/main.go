// Command docgen writes the configuration reference of docs/operations.md
// from the commands' own --help output, so the two cannot drift apart.
// Run it with "make docs"; CI checks that the committed file is current.
package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"

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
}

func main() {
	// kong wraps help to $COLUMNS; the reference must not depend on the
	// terminal it was generated in.
	os.Unsetenv("COLUMNS")
	path := "docs/operations.md"
	if len(os.Args) > 1 {
		path = os.Args[1]
	}
	if err := run(path); err != nil {
		fmt.Fprintln(os.Stderr, "docgen:", err)
		os.Exit(1)
	}
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
	cmds, err := commands()
	if err != nil {
		return err
	}
	var ref strings.Builder
	ref.WriteString(begin + "\n")
	for _, c := range cmds {
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
