package aegisctl

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// VerdictFilter is the server-side filter of observe and top.
type VerdictFilter struct {
	Verdict  string   `name:"verdict" enum:",pass,drop" default:"" help:"Only frames enforcement passes or drops (a would-be drop in monitor mode is a drop)."`
	Reason   []string `name:"reason" help:"Only these reasons (counted reason or cause), e.g. no_session,expired."`
	From     string   `name:"from" help:"Only sources in this prefix or address."`
	To       string   `name:"to" help:"Only destinations in this prefix or address."`
	Port     uint16   `name:"port" help:"Only this source or destination port."`
	Protocol string   `name:"protocol" help:"Only this protocol: tcp, udp, icmp, icmpv6 or a number."`
}

func (f *VerdictFilter) request() (*agentv1.WatchVerdictsRequest, error) {
	req := &agentv1.WatchVerdictsRequest{
		Verdict: f.Verdict, Reasons: f.Reason, SourceCidr: f.From, DestinationCidr: f.To, Port: uint32(f.Port),
	}
	if f.Protocol != "" {
		p, err := parseProtocol(f.Protocol)
		if err != nil {
			return nil, err
		}
		req.Protocol = uint32(p)
	}
	return req, nil
}

func parseProtocol(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "tcp":
		return uint8(state.TCP), nil
	case "udp":
		return uint8(state.UDP), nil
	case "icmp":
		return uint8(state.ICMP), nil
	case "icmpv6", "ipv6-icmp":
		return uint8(state.ICMPv6), nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("parse protocol %q: want tcp, udp, icmp, icmpv6 or 0-255", s)
	}
	return uint8(n), nil
}

func protoName(p uint32) string {
	if p == 0 {
		return "-" // an event of a frame whose L4 did not parse
	}
	return state.Protocol(p).String()
}

// ObserveCmd streams the data path's sampled verdict events.
type ObserveCmd struct {
	Conn          `embed:""`
	VerdictFilter `embed:""`
	JSON          bool          `name:"json" help:"Print one JSON object per event."`
	Since         time.Duration `name:"since" help:"First the history of this long ago to now, e.g. 5m."`
	Last          uint32        `name:"last" help:"First the last N events of the history."`
	Follow        bool          `name:"follow" default:"true" negatable:"" help:"Keep streaming live events (--no-follow: stop after the history)."`
}

// ObservedEvent is one line of observe --json.
type ObservedEvent struct {
	Time        time.Time `json:"time"`
	Interface   string    `json:"interface"`
	Source      string    `json:"source"`
	SourcePort  uint32    `json:"source_port"`
	Destination string    `json:"destination"`
	DestPort    uint32    `json:"destination_port"`
	Protocol    string    `json:"protocol"`
	Verdict     string    `json:"verdict"`
	Action      string    `json:"action"`
	Reason      string    `json:"reason"`
	Cause       string    `json:"cause"`
	Length      uint32    `json:"length"`
	Lost        uint64    `json:"lost,omitempty"`
}

func observed(r *agentv1.WatchVerdictsResponse) ObservedEvent {
	e := r.GetEvent()
	iface := e.GetInterface()
	if iface == "" {
		iface = strconv.Itoa(int(e.GetIfindex()))
	}
	return ObservedEvent{
		Time: e.GetTime().AsTime().Local(), Interface: iface, Source: e.GetSource(), SourcePort: e.GetSourcePort(),
		Destination: e.GetDestination(), DestPort: e.GetDestinationPort(), Protocol: protoName(e.GetProtocol()),
		Verdict: e.GetVerdict(), Action: e.GetAction(), Reason: e.GetReason(), Cause: e.GetCause(),
		Length: e.GetLength(), Lost: r.GetLost(),
	}
}

func endpoint(addr string, port uint32) string {
	if addr == "" {
		return "-"
	}
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return addr
	}
	return netip.AddrPortFrom(a, uint16(port)).String()
}

// Run streams until interrupted or, with --no-follow, until the history
// is sent.
func (cmd *ObserveCmd) Run(ctx context.Context, stdio cli.IO) error {
	req, err := cmd.request()
	if err != nil {
		return err
	}
	if cmd.Since > 0 {
		req.Since = timestamppb.New(time.Now().Add(-cmd.Since))
	}
	req.Last, req.NoFollow = cmd.Last, !cmd.Follow
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer func() { done() }()
	stream, err := client.WatchVerdicts(ctx, req)
	if err != nil {
		return callError("watch verdicts", cmd.Address, err)
	}
	var last time.Time // of the newest event shown, for a reconnection
	var tw *tabwriter.Writer
	if !cmd.JSON {
		tw = tabwriter.NewWriter(stdio.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TIME\tINTERFACE\tSOURCE\t\tDESTINATION\tPROTO\tVERDICT\tREASON\tLENGTH")
		tw.Flush()
	}
	enc := json.NewEncoder(stdio.Stdout)
	var lost uint64
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) || ctx.Err() != nil {
			return nil
		}
		if err != nil {
			// Unavailable: the stream ended by a control plane that shuts
			// down (a restart); retryable: the connection itself is gone.
			shutdown := status.Code(err) == codes.Unavailable
			err = callError("watch verdicts", cmd.Address, err)
			if !cmd.Follow || !(shutdown || retryable(err)) {
				return err
			}
			// A control plane restarting: say so once, wait for it with
			// the same backoff as watch, and go on from the newest event
			// shown, so that a history the control plane kept is not
			// shown twice.
			fmt.Fprintf(stdio.Stderr, "aegisctl: observe: lost the control plane at %s, reconnecting: %v\n", cmd.Address, err)
			done()
			if client, done, err = cmd.reconnect(ctx, stdio.Stderr, "observe"); err != nil {
				return err
			}
			if ctx.Err() != nil {
				return nil
			}
			again := proto.Clone(req).(*agentv1.WatchVerdictsRequest)
			again.Last = 0
			if !last.IsZero() {
				again.Since = timestamppb.New(last.Add(time.Nanosecond))
			}
			if stream, err = client.WatchVerdicts(ctx, again); err != nil {
				return callError("watch verdicts", cmd.Address, err)
			}
			lost = 0 // the counter is the new stream's
			continue
		}
		e := observed(r)
		last = e.Time
		if cmd.JSON {
			if err := enc.Encode(e); err != nil {
				return err
			}
			continue
		}
		if e.Lost > lost {
			fmt.Fprintf(tw, "# %d events lost: this terminal did not keep up\n", e.Lost-lost)
			lost = e.Lost
		}
		reason := e.Reason
		if e.Cause != e.Reason {
			reason = e.Reason + " (" + e.Cause + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t->\t%s\t%s\t%s\t%s\t%d\n", e.Time.Format("15:04:05.000"), e.Interface,
			endpoint(e.Source, e.SourcePort), endpoint(e.Destination, e.DestPort), e.Protocol, e.Verdict, reason, e.Length)
		tw.Flush()
	}
}

// TopCmd ranks the sources, destinations and ports of the dropped frames
// in the control plane's event history.
type TopCmd struct {
	Conn          `embed:""`
	VerdictFilter `embed:""`
	Since         time.Duration `name:"since" default:"5m" help:"How far back to look."`
	N             int           `name:"n" default:"10" help:"Rows per table."`
	JSON          bool          `name:"json" help:"Print JSON."`
}

// TopRow is one ranked key.
type TopRow struct {
	Key    string `json:"key"`
	Events int    `json:"events"`
}

// Top is what top prints.
type Top struct {
	Events       int      `json:"events"`
	Sources      []TopRow `json:"sources"`
	Destinations []TopRow `json:"destinations"`
	Ports        []TopRow `json:"ports"`
}

func rank(counts map[string]int, n int) []TopRow {
	rows := make([]TopRow, 0, len(counts))
	for k, v := range counts {
		rows = append(rows, TopRow{k, v})
	}
	slices.SortFunc(rows, func(a, b TopRow) int {
		return cmp.Or(cmp.Compare(b.Events, a.Events), cmp.Compare(a.Key, b.Key))
	})
	return rows[:min(n, len(rows))]
}

// Run computes the ranking from the history; the events are samples, so
// the figures rank, they do not count packets (stats does).
func (cmd *TopCmd) Run(ctx context.Context, stdio cli.IO) error {
	if cmd.Verdict == "" {
		cmd.Verdict = "drop"
	}
	req, err := cmd.request()
	if err != nil {
		return err
	}
	req.Since, req.NoFollow = timestamppb.New(time.Now().Add(-cmd.Since)), true
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	c, cancel := cmd.ctx(ctx)
	defer cancel()
	stream, err := client.WatchVerdicts(c, req)
	if err != nil {
		return callError("watch verdicts", cmd.Address, err)
	}
	src, dst, port := map[string]int{}, map[string]int{}, map[string]int{}
	var top Top
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return callError("watch verdicts", cmd.Address, err)
		}
		e := observed(r)
		top.Events++
		src[cmp.Or(e.Source, "-")]++
		dst[cmp.Or(e.Destination, "-")]++
		if e.Protocol == "tcp" || e.Protocol == "udp" {
			port[fmt.Sprintf("%d/%s", e.DestPort, e.Protocol)]++
		}
	}
	top.Sources, top.Destinations, top.Ports = rank(src, cmd.N), rank(dst, cmd.N), rank(port, cmd.N)
	if cmd.JSON {
		return writeJSON(stdio.Stdout, top)
	}
	tw := tabwriter.NewWriter(stdio.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "%d sampled %s events in the last %v\n", top.Events, cmd.Verdict, cmd.Since)
	for _, t := range []struct {
		title string
		rows  []TopRow
	}{{"SOURCE", top.Sources}, {"DESTINATION", top.Destinations}, {"PORT", top.Ports}} {
		fmt.Fprintf(tw, "\n%s\tEVENTS\n", t.title)
		for _, r := range t.rows {
			fmt.Fprintf(tw, "%s\t%d\n", r.Key, r.Events)
		}
	}
	return tw.Flush()
}
