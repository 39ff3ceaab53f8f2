// Package cli is what every Aegis command has in common: kong parsing with
// an AEGIS_* environment variable for every flag, --log-level,
// --log-format, --version, and a Run that returns an exit code instead of
// calling os.Exit, so that tests drive the real command line.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"time"

	"github.com/alecthomas/kong"
	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
)

// version is set at build time: -ldflags "-X .../internal/cli.version=v1.2.3".
var version = ""

// Version returns the build's version: the one set at link time, else the
// VCS revision Go recorded, else "dev".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		var rev, dirty string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "-dirty"
				}
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			return rev + dirty
		}
	}
	return "dev"
}

// Globals are the flags every command has.
type Globals struct {
	LogLevel  string           `default:"info" enum:"trace,debug,info,warn,error" help:"Log level: ${enum}."`
	LogFormat string           `default:"auto" enum:"auto,json,console" help:"Log format: json, console, or auto (console on a terminal, json otherwise)."`
	Version   kong.VersionFlag `env:"-" help:"Print the version and exit."`
}

// Logger builds the process's logger on w.
func (g *Globals) Logger(w io.Writer) zerolog.Logger {
	level, err := zerolog.ParseLevel(g.LogLevel)
	if err != nil {
		level = zerolog.InfoLevel
	}
	console := g.LogFormat == "console"
	if g.LogFormat == "auto" || g.LogFormat == "" {
		if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			console = true
		}
	}
	out := w
	if console {
		out = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	}
	return zerolog.New(out).Level(level).With().Timestamp().Logger()
}

// IO is what a command reads and writes besides its arguments.
type IO struct {
	Stdout io.Writer
	Stderr io.Writer
}

type exitCode int

// Run parses args into grammar (a kong struct embedding Globals) and calls
// the selected command's Run method, binding ctx, the IO and the logger.
// Errors are printed as one line on stderr, prefixed with name. It returns
// the process exit code: 0 on success, 1 when the command failed, 2 for a
// usage error.
func Run(ctx context.Context, name, description string, grammar any, globals *Globals,
	args []string, stdio IO, opts ...kong.Option) (code int) {
	defer func() {
		if r := recover(); r != nil {
			if c, ok := r.(exitCode); ok {
				code = int(c)
				return
			}
			panic(r)
		}
	}()
	options := append([]kong.Option{
		kong.Name(name),
		kong.Description(description),
		kong.Writers(stdio.Stdout, stdio.Stderr),
		kong.Exit(func(c int) { panic(exitCode(c)) }),
		kong.DefaultEnvars("AEGIS"),
		kong.Vars{"version": name + " " + Version()},
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
	}, opts...)
	parser, err := kong.New(grammar, options...)
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, err)
		return 2
	}
	log := globals.Logger(stdio.Stderr)
	kctx.BindTo(ctx, (*context.Context)(nil))
	kctx.Bind(stdio, log)
	if err := kctx.Run(); err != nil {
		if e := (*ExitError)(nil); errors.As(err, &e) {
			if e.Err != nil {
				fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, e.Err)
			}
			return e.Code
		}
		fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, err)
		if u := (*UsageError)(nil); errors.As(err, &u) {
			return 2
		}
		return 1
	}
	return 0
}

// UsageError marks an error in the command line that kong's own checks
// cannot see (a malformed address, say); Run exits 2 for it.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// ExitError ends a command with a documented exit code of its own. Run
// prints Err like any error; with a nil Err the command has already
// reported on stdout.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}
func (e *ExitError) Unwrap() error { return e.Err }
