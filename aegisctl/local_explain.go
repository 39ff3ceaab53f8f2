package aegisctl

import (
	"context"
	"fmt"
	"io"
	"net/netip"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/explain"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// LocalExplainCmd is "aegisctl local explain".
type LocalExplainCmd struct {
	Src   string `arg:"" help:"Source address."`
	Dst   string `arg:"" help:"Destination address."`
	Port  uint16 `arg:"" help:"Destination port."`
	Proto string `arg:"" optional:"" default:"tcp" help:"tcp or udp."`
	Sport uint16 `name:"sport" help:"Source port (default 40000, an ephemeral port)."`
	JSON  bool   `name:"json" help:"Print JSON."`
}

// Explanation is what explain prints.
type Explanation struct {
	Flow    string `json:"flow"`
	Action  string `json:"action"`
	Reason  string `json:"reason"`
	Cause   string `json:"cause"`
	Verdict string `json:"verdict"`
	Why     string `json:"why"`
}

func describe(res *explain.Result) Explanation {
	e := Explanation{
		Flow: res.FlowString(), Action: res.Action.Verdict(), Reason: res.Reason.String(), Cause: res.Cause.String(),
		Verdict: res.Cause.Verdict(), Why: res.Why(),
	}
	return e
}

func (cmd *LocalExplainCmd) flow() (explain.Flow, error) {
	src, err := netip.ParseAddr(cmd.Src)
	if err != nil {
		return explain.Flow{}, fmt.Errorf("parse source: %w", err)
	}
	dst, err := netip.ParseAddr(cmd.Dst)
	if err != nil {
		return explain.Flow{}, fmt.Errorf("parse destination: %w", err)
	}
	p, err := parseProtocol(cmd.Proto)
	if err != nil {
		return explain.Flow{}, err
	}
	return explain.Flow{Src: src, Dst: dst, Sport: cmd.Sport, Port: cmd.Port, Proto: p}, nil
}

// Run explains the flow from the pinned maps, changing nothing.
func (cmd *LocalExplainCmd) Run(parent *LocalCmd, stdio cli.IO) error {
	f, err := cmd.flow()
	if err != nil {
		return err
	}
	m, err := openLocal(parent.PinPath)
	if err != nil {
		return err
	}
	defer m.Close()
	loc := explain.ForPins(parent.PinPath)
	defer loc.Close()
	res, err := explain.Explain(m, f, loc.Local)
	if err == nil {
		err = loc.Err()
	}
	if err != nil {
		return err
	}
	e := describe(res)
	if n := loc.Note(); n != "" {
		e.Why += "; " + n
	}
	return writeExplanation(stdio.Stdout, e, cmd.JSON)
}

func writeExplanation(w io.Writer, e Explanation, asJSON bool) error {
	if asJSON {
		return writeJSON(w, e)
	}
	reason := e.Reason
	if e.Cause != e.Reason {
		reason += " (" + e.Cause + ")"
	}
	_, err := fmt.Fprintf(w, "flow     %s\nverdict  %s: %s\nwhy      %s\n", e.Flow, e.Action, reason, e.Why)
	return err
}

// ExplainCmd is "aegisctl explain": the control plane explains from the
// live maps.
type ExplainCmd struct {
	Conn  `embed:""`
	Src   string `arg:"" help:"Source address."`
	Dst   string `arg:"" help:"Destination address."`
	Port  uint16 `arg:"" help:"Destination port."`
	Proto string `arg:"" optional:"" default:"tcp" help:"tcp or udp."`
	Sport uint16 `name:"sport" help:"Source port (default 40000, an ephemeral port)."`
	JSON  bool   `name:"json" help:"Print JSON."`
}

// Run asks the control plane.
func (cmd *ExplainCmd) Run(ctx context.Context, stdio cli.IO) error {
	p, err := parseProtocol(cmd.Proto)
	if err != nil {
		return err
	}
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	c, cancel := cmd.ctx(ctx)
	defer cancel()
	resp, err := client.Explain(c, &agentv1.ExplainRequest{Source: cmd.Src, Destination: cmd.Dst,
		DestinationPort: uint32(cmd.Port), Protocol: uint32(p), SourcePort: uint32(cmd.Sport)})
	if err != nil {
		return callError("explain", cmd.Address, err)
	}
	verdict := resp.GetVerdict()
	if r, ok := bpf.ParseReason(resp.GetCause()); verdict == "" && ok {
		verdict = r.Verdict() // a control plane from before the field
	}
	return writeExplanation(stdio.Stdout, Explanation{Flow: resp.GetFlow(), Action: resp.GetAction(), Reason: resp.GetReason(),
		Cause: resp.GetCause(), Verdict: verdict, Why: resp.GetWhy()}, cmd.JSON)
}
