package aegisctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"time"

	"github.com/mattn/go-isatty"

	"github.com/aegis-agent/aegis/internal/cli"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// WatchCmd is "aegisctl watch".
type WatchCmd struct {
	Conn     `embed:""`
	Interval time.Duration `default:"2s" help:"Refresh period."`
	Count    int           `help:"Stop after this many refreshes; 0 runs until interrupted."`
	User     string        `short:"u" help:"Only this user's sessions."`
	JSON     bool          `name:"json" help:"Print one JSON object a line per refresh: time, counters and maps (as stats --json), sessions (as sessions --json, at most 50), matched."`
}

// WatchFrame is one refresh of "aegisctl watch --json", one line each:
// what "stats --json" and "sessions --json" print, at one time. Rates are
// left to the reader: two frames' packets and times give them.
type WatchFrame struct {
	Time time.Time `json:"time"`
	Stats
	Sessions []SessionRow `json:"sessions"`
	// Matched is how many sessions matched, shown or not.
	Matched uint64 `json:"matched"`
}

// Reconnection backoff of watch: exponential from backoffMin to
// backoffMax, each wait drawn within ±backoffJitter of its nominal value
// so that many watchers of one restarted control plane do not call in
// step.
const (
	backoffMin    = 500 * time.Millisecond
	backoffMax    = 10 * time.Second
	backoffJitter = 0.2
)

// backoff is the wait before reconnection attempt n (0-based).
func backoff(n int) time.Duration {
	d := backoffMin
	for i := 0; i < n && d < backoffMax; i++ {
		d *= 2
	}
	d = min(d, backoffMax)
	return time.Duration(float64(d) * (1 + backoffJitter*(2*rand.Float64()-1)))
}

// Run refreshes the view until ctx ends or Count refreshes were shown,
// with --json as one WatchFrame a line. A connection lost (a control plane
// restarting) is one line on stderr, then reconnection attempts with
// backoff until it is back, also one line; a failure that waiting cannot
// fix (a refused certificate, a bad request) ends the command, as does a
// first call that fails.
func (cmd *WatchCmd) Run(ctx context.Context, stdio cli.IO) error {
	if cmd.Interval <= 0 {
		return &cli.UsageError{Err: fmt.Errorf("--interval must be positive")}
	}
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer func() { done() }()
	tty := false
	if f, ok := stdio.Stdout.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
		tty = true
	}
	var prev *Stats
	var prevAt time.Time
	tick := time.NewTicker(cmd.Interval)
	defer tick.Stop()
	for frame := 1; ; frame++ {
		st, rows, matched, err := cmd.fetch(ctx, client)
		if err != nil && frame > 1 && retryable(err) && ctx.Err() == nil {
			fmt.Fprintf(stdio.Stderr, "aegisctl: watch: lost the control plane at %s, reconnecting: %v\n", cmd.Address, err)
			done()
			if client, done, err = cmd.reconnect(ctx, stdio.Stderr, "watch"); err != nil {
				return err
			}
			if ctx.Err() != nil {
				return nil
			}
			st, rows, matched, err = cmd.fetch(ctx, client)
			// A rate across the outage would mix two processes' counters.
			prev = nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		now := time.Now()
		if cmd.JSON {
			sortSessions(rows)
			if err := writeJSONLine(stdio.Stdout, WatchFrame{Time: now.UTC(), Stats: st, Sessions: rows, Matched: matched}); err != nil {
				return err
			}
		} else if err := cmd.writeFrame(stdio.Stdout, tty, frame, now, st, prev, prevAt, rows, matched); err != nil {
			return err
		}
		prev, prevAt = &st, now
		if cmd.Count > 0 && frame >= cmd.Count {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// writeFrame prints one refresh of the live view. On a terminal it
// replaces the last; otherwise frames follow each other, separated by a
// line.
func (cmd *WatchCmd) writeFrame(w io.Writer, tty bool, frame int, now time.Time, st Stats, prev *Stats, prevAt time.Time, rows []SessionRow, matched uint64) error {
	if tty {
		fmt.Fprint(w, "\x1b[H\x1b[2J")
	} else if frame > 1 {
		fmt.Fprintln(w, "---")
	}
	fmt.Fprintf(w, "aegisctl watch  %s  every %v  %s\n\n", cmd.Address, cmd.Interval, now.Format(time.TimeOnly))
	writeRates(w, st, prev, now.Sub(prevAt))
	fmt.Fprintln(w)
	if err := WriteSessions(w, rows, now); err != nil {
		return err
	}
	if matched > uint64(len(rows)) {
		fmt.Fprintf(w, "%d more not shown\n", matched-uint64(len(rows)))
	}
	return nil
}

func (cmd *WatchCmd) fetch(ctx context.Context, client agentv1.AgentServiceClient) (Stats, []SessionRow, uint64, error) {
	st, err := getStats(ctx, &cmd.Conn, client)
	if err != nil {
		return Stats{}, nil, 0, err
	}
	rows, matched, err := listSessions(ctx, &cmd.Conn, client, &agentv1.ListSessionsRequest{User: cmd.User}, 50)
	if err != nil {
		return Stats{}, nil, 0, err
	}
	return st, rows, matched, nil
}

// reconnect dials afresh until a call succeeds, a failure that waiting
// cannot fix happens, or ctx ends (then it returns a nil error and a
// client that is not used). Each attempt is a new connection, so the wait
// is this backoff alone, not also gRPC's own reconnection backoff. what
// names the command in the line that says the connection is back.
func (c *Conn) reconnect(ctx context.Context, stderr io.Writer, what string) (agentv1.AgentServiceClient, func(), error) {
	for attempt := 0; ; attempt++ {
		select {
		case <-ctx.Done():
			return nil, func() {}, nil
		case <-time.After(backoff(attempt)):
		}
		client, done, err := c.agent()
		if err != nil {
			return nil, func() {}, err
		}
		_, err = getStats(ctx, c, client)
		if err == nil {
			fmt.Fprintf(stderr, "aegisctl: %s: connected to %s again\n", what, c.Address)
			return client, done, nil
		}
		done()
		if !retryable(err) {
			return nil, func() {}, err
		}
	}
}

// retryable tells whether a failed call may succeed later by itself.
func retryable(err error) bool {
	var ce *ConnError
	return errors.As(err, &ce) && ce.Retryable()
}

// writeRates prints the counters with packets per second since prev.
func writeRates(w io.Writer, st Stats, prev *Stats, elapsed time.Duration) {
	rate := func(i int, c CounterRow) string {
		if prev == nil || i >= len(prev.Counters) || elapsed <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.0f", float64(c.Packets-prev.Counters[i].Packets)/elapsed.Seconds())
	}
	fmt.Fprintf(w, "%-7s %-16s %14s %10s\n", "VERDICT", "REASON", "PACKETS", "PKT/S")
	for i, c := range st.Counters {
		fmt.Fprintf(w, "%-7s %-16s %14d %10s\n", c.Verdict, c.Reason, c.Packets, rate(i, c))
	}
	for _, m := range st.Maps {
		fmt.Fprintf(w, "sessions_%s: %d of %d\n", m.Family, m.Entries, m.Capacity)
	}
}
