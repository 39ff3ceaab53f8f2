// Package cli is what every Aegis command has in common: kong parsing with
// one environment scheme (see Spec), --log-level, --log-format, --version,
// and a Run that returns an exit code instead of calling os.Exit, so that
// tests drive the real command line.
//
// The environment scheme, checked by env_test.go over every flag of every
// binary:
//
//   - The loader and the daemons read AEGIS_<FLAG> for every flag (the
//     variables /etc/aegis/aegis.env carries), except flags marked
//     env:"-": those that choose what one invocation does or prints rather
//     than how the gateway is configured (aegis-loader unload --iface,
//     --json).
//   - aegisctl reads AEGISCTL_* only, and only for settings: where and how
//     to connect, where the pins and the certificates are, logging. A flag
//     that says what to do (a user to revoke, --force, --json) never reads
//     the environment: aegisctl declares each variable it reads, so a new
//     flag reads none until someone decides it should.
//   - No variable means two things: one variable may be read by several
//     flags only if they are the same setting (same name, type and help),
//     or a setting several binaries share by design (the pin path, the
//     agent's gRPC port).
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

// Globals are the flags every command has. Their variables take the
// binary's prefix (Spec.EnvPrefix).
type Globals struct {
	LogLevel  string           `default:"info" enum:"trace,debug,info,warn,error" env:"${env_prefix}_LOG_LEVEL" help:"Log level: ${enum}."`
	LogFormat string           `default:"auto" enum:"auto,json,console" env:"${env_prefix}_LOG_FORMAT" help:"Log format: json, console, or auto (console on a terminal, json otherwise)."`
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

// Spec is what identifies one binary's command line.
type Spec struct {
	Name        string
	Description string
	// EnvPrefix is the prefix of the binary's environment variables.
	EnvPrefix string
	// EveryFlag makes every flag without an env tag read
	// EnvPrefix_<FLAG> (the daemons' scheme); without it only flags that
	// declare env:"..." read the environment (aegisctl's).
	EveryFlag bool
	Vars      kong.Vars
}

// New builds the parser of grammar as Run uses it; tests walk its Model.
func (s Spec) New(grammar any, stdio IO, opts ...kong.Option) (*kong.Kong, error) {
	vars := kong.Vars{"version": s.Name + " " + Version(), "env_prefix": s.EnvPrefix}
	for k, v := range s.Vars {
		vars[k] = v
	}
	options := []kong.Option{
		kong.Name(s.Name),
		kong.Description(s.Description),
		kong.Writers(stdio.Stdout, stdio.Stderr),
		kong.Exit(func(c int) { panic(exitCode(c)) }),
		vars,
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
	}
	if s.EveryFlag {
		options = append(options, kong.DefaultEnvars(s.EnvPrefix))
	}
	// env:"-" means no variable in either scheme; DefaultEnvars already
	// honours it, this hook (after it) does for the explicit scheme.
	options = append(options, kong.PostBuild(func(k *kong.Kong) error {
		return kong.Visit(k.Model, func(n kong.Visitable, next kong.Next) error {
			if f, ok := n.(*kong.Flag); ok && len(f.Envs) == 1 && f.Envs[0] == "-" {
				f.Envs, f.Value.Tag.Envs = nil, nil
			}
			return next(nil)
		})
	}))
	return kong.New(grammar, append(options, opts...)...)
}

// Run parses args into grammar (a kong struct embedding Globals) and calls
// the selected command's Run method, binding ctx, the IO and the logger.
// Errors are printed as one line on stderr, prefixed with the name. It
// returns the process exit code: 0 on success, 1 when the command failed,
// 2 for a usage error.
func Run(ctx context.Context, spec Spec, grammar any, globals *Globals,
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
	name := spec.Name
	parser, err := spec.New(grammar, stdio, opts...)
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, err)
		return 2
	}
	if fn, ok := ctx.Value(modelKey{}).(func(*kong.Kong)); ok {
		fn(parser)
		return 0
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

type modelKey struct{}

// WithModel returns a context under which Run builds the command's kong
// parser, with the variables and options its Main gives it, hands it to
// fn and returns 0 without parsing or running anything. The man pages and
// shell completions are generated from that model, so they describe the
// flags, defaults and environment variables the binary really has.
func WithModel(ctx context.Context, fn func(*kong.Kong)) context.Context {
	return context.WithValue(ctx, modelKey{}, fn)
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
