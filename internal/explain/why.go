package explain

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// RoutedLocally answers the data path's locality question (bpf_fib_lookup
// from the public side) with the kernel's route for dst in the caller's
// network namespace: local, broadcast and anycast routes, and no route at
// all, are not forwarded. It ignores policy rules keyed on the ingress
// interface, which the data path's lookup would apply.
func RoutedLocally(dst netip.Addr) bool {
	routes, err := netlink.RouteGet(dst.AsSlice())
	if err != nil || len(routes) == 0 {
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

// FlowString spells the flow as "tcp 192.0.2.10:40000 -> 198.51.100.10:22".
func (r *Result) FlowString() string {
	f := r.Flow
	return fmt.Sprintf("%s %s -> %s", state.Protocol(f.Proto), netip.AddrPortFrom(f.Src, f.Sport), netip.AddrPortFrom(f.Dst, f.Port))
}

func left(d time.Duration) string {
	if d <= 0 {
		return "none (" + (-d).Round(time.Second).String() + " ago)"
	}
	return d.Round(time.Second).String()
}

// Why says, for a person, what decides the verdict.
func (r *Result) Why() string {
	var why string
	switch r.Cause {
	case bpf.ReasonSession, bpf.ReasonExpired:
		s := r.Session
		p := "any-protocol"
		if r.SessionProto != 0 {
			p = state.Protocol(r.SessionProto).String()
		}
		life := "no lifetime cap"
		if s.Expires != 0 {
			life = "lifetime left " + left(r.LifetimeLeft)
		}
		st := "live"
		if r.Cause == bpf.ReasonExpired {
			st = "expired (and no reply flow or allow rule admits it)"
		}
		why = fmt.Sprintf("%s session of user %q (%s): idle left %s, %s", st, s.User, p, left(r.IdleLeft), life)
	case bpf.ReasonReply:
		why = fmt.Sprintf("reply to a flow this side opened, last seen %v ago",
			time.Duration(int64(state.Now()-r.ReplyFlow.LastSeenNs)).Round(time.Millisecond))
	case bpf.ReasonAllowlist:
		var rules []string
		for _, p := range r.AllowRules {
			s := state.Protocol(p.Proto).String()
			if p.Port != 0 {
				s += "/" + strconv.Itoa(int(p.Port))
			}
			rules = append(rules, s)
		}
		why = "an allow rule covering the source admits it (rules for the source: " + strings.Join(rules, " ") + ")"
		if p := r.AllowRule; p != nil && p.Rule != 0 {
			why += fmt.Sprintf("; it counts against rule id %d", p.Rule)
		}
	case bpf.ReasonController:
		why = "the controller bypass"
	case bpf.ReasonNoSession:
		why = "no session (exact protocol or any-protocol), no live reply flow and no allow rule admits it"
	default:
		why = r.Cause.String()
	}
	if r.Reason == bpf.ReasonMonitor {
		why += "; monitor mode passes it, enforcement would drop it"
	}
	return why
}
