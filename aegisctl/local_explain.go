package aegisctl

import (
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/explain"
	"github.com/aegis-agent/aegis/internal/state"
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

// routedLocally answers the data path's locality question (bpf_fib_lookup
// from the public side) with the kernel's route for dst: local, broadcast
// and anycast routes, and no route at all, are not forwarded.
func routedLocally(dst netip.Addr) bool {
	routes, err := netlink.RouteGet(dst.AsSlice())
	if err != nil {
		return true // no route: the data path's NOT_FWDED
	}
	for _, r := range routes {
		switch r.Type {
		case unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_ANYCAST:
			return true
		}
	}
	return false
}

func describe(res *explain.Result) Explanation {
	f := res.Flow
	proto := protoName(uint32(f.Proto))
	e := Explanation{
		Flow:   fmt.Sprintf("%s %s -> %s", proto, netip.AddrPortFrom(f.Src, f.Sport), netip.AddrPortFrom(f.Dst, f.Port)),
		Action: "drop", Reason: res.Reason.String(), Cause: res.Cause.String(), Verdict: res.Cause.Verdict(),
	}
	if res.Action == bpf.XDPPass {
		e.Action = "pass"
	}
	var why string
	switch res.Cause {
	case bpf.ReasonSession, bpf.ReasonExpired:
		s := res.Session
		p := "any-protocol"
		if res.SessionProto != 0 {
			p = protoName(uint32(res.SessionProto))
		}
		life := "no lifetime cap"
		if s.Expires != 0 {
			life = "lifetime left " + left(res.LifetimeLeft)
		}
		st := "live"
		if res.Cause == bpf.ReasonExpired {
			st = "expired (and no reply flow or allow rule admits it)"
		}
		why = fmt.Sprintf("%s session of user %q (%s): idle left %s, %s", st, s.User, p, left(res.IdleLeft), life)
	case bpf.ReasonReply:
		why = fmt.Sprintf("reply to a flow this side opened, last seen %v ago", time.Duration(int64(state.Now()-res.ReplyFlow.LastSeenNs)).Round(time.Millisecond))
	case bpf.ReasonAllowlist:
		var rules []string
		for _, r := range res.AllowRules {
			rules = append(rules, allowPort(r))
		}
		why = "an allow rule covering the source admits it (rules for the source: " + strings.Join(rules, " ") + ")"
	case bpf.ReasonController:
		why = "the controller bypass"
	case bpf.ReasonNoSession:
		why = "no session (exact protocol or any-protocol), no live reply flow and no allow rule admits it"
	default:
		why = res.Cause.String()
	}
	if res.Reason == bpf.ReasonMonitor {
		why += "; monitor mode passes it, enforcement would drop it"
	}
	e.Why = why
	return e
}

func left(d time.Duration) string {
	if d <= 0 {
		return "none (" + (-d).Round(time.Second).String() + " ago)"
	}
	return d.Round(time.Second).String()
}

func allowPort(p bpf.AegisAllowPort) string {
	proto := "any"
	if p.Proto != 0 {
		proto = protoName(uint32(p.Proto))
	}
	if p.Port == 0 {
		return proto
	}
	return proto + "/" + strconv.Itoa(int(p.Port))
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
	res, err := explain.Explain(m, f, routedLocally)
	if err != nil {
		return err
	}
	return writeExplanation(stdio.Stdout, describe(res), cmd.JSON)
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
