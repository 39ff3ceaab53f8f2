package aegisctl

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/aegis-agent/aegis/internal/state"
)

// SessionRow is one session as aegisctl shows it, whether it came over
// gRPC or straight from the pinned maps. Its JSON follows the field names
// of docs/operations.md: src, dst, dport, proto, family.
type SessionRow struct {
	User     string
	Protocol string
	Source   netip.Addr
	Dest     netip.AddrPort
	Created  time.Time
	LastSeen time.Time
	// Expires is the end of the lifetime; zero for none.
	Expires     time.Time
	IdleTimeout time.Duration
	// Left is how long until the data path refuses the session.
	Left    time.Duration
	Expired bool
}

// sessionJSON is SessionRow's JSON form.
type sessionJSON struct {
	User        string        `json:"user"`
	Proto       string        `json:"proto"`
	Family      string        `json:"family"`
	Src         netip.Addr    `json:"src"`
	Dst         netip.Addr    `json:"dst"`
	Dport       uint16        `json:"dport"`
	Created     time.Time     `json:"create_time"`
	LastSeen    time.Time     `json:"last_seen_time"`
	Expires     time.Time     `json:"expire_time,omitzero"`
	IdleTimeout time.Duration `json:"idle_timeout_ns"`
	Left        time.Duration `json:"time_left_ns"`
	Expired     bool          `json:"expired"`
}

// Family names, as in metric labels and logs.
const (
	FamilyIPv4 = "ipv4"
	FamilyIPv6 = "ipv6"
)

func family(a netip.Addr) string {
	if a.Is4() {
		return FamilyIPv4
	}
	return FamilyIPv6
}

func (r SessionRow) json() sessionJSON {
	return sessionJSON{
		User: r.User, Proto: r.Protocol, Family: family(r.Source), Src: r.Source, Dst: r.Dest.Addr(), Dport: r.Dest.Port(),
		Created: r.Created, LastSeen: r.LastSeen, Expires: r.Expires, IdleTimeout: r.IdleTimeout, Left: r.Left, Expired: r.Expired,
	}
}

// MarshalJSON writes the row in the documented field names.
func (r SessionRow) MarshalJSON() ([]byte, error) {
	return json.Marshal(r.json())
}

// Results of a grant or a revoke, as the control plane's audit log and
// metrics name them.
const (
	ResultCreated   = "created"
	ResultRefreshed = "refreshed"
	ResultRevoked   = "revoked"
	ResultNotFound  = "not_found"
)

// Grant is what "aegisctl login --json" prints: the result and, in the
// same object, the session's fields as "sessions --json" has them.
type Grant struct {
	// Result is ResultCreated or ResultRefreshed.
	Result  string
	Session SessionRow
}

// MarshalJSON writes result and the session's fields in one object.
func (g Grant) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Result string `json:"result"`
		sessionJSON
	}{g.Result, g.Session.json()})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (g *Grant) UnmarshalJSON(b []byte) error {
	var r struct {
		Result string `json:"result"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return err
	}
	g.Result = r.Result
	return json.Unmarshal(b, &g.Session)
}

// Revocation is what "aegisctl logout --json" prints: the result, how
// many sessions were revoked, and what was asked for (the user, the
// session key: empty when not given).
type Revocation struct {
	// Result is ResultRevoked, or ResultNotFound when none was.
	Result  string `json:"result"`
	Revoked uint32 `json:"revoked"`
	User    string `json:"user,omitempty"`
	Proto   string `json:"proto,omitempty"`
	Family  string `json:"family,omitempty"`
	Src     string `json:"src,omitempty"`
	Dst     string `json:"dst,omitempty"`
	Dport   uint32 `json:"dport,omitempty"`
}

// UnmarshalJSON reads what MarshalJSON writes.
func (r *SessionRow) UnmarshalJSON(b []byte) error {
	var j sessionJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*r = SessionRow{User: j.User, Protocol: j.Proto, Source: j.Src, Dest: netip.AddrPortFrom(j.Dst, j.Dport),
		Created: j.Created, LastSeen: j.LastSeen, Expires: j.Expires, IdleTimeout: j.IdleTimeout, Left: j.Left, Expired: j.Expired}
	return nil
}

// CounterRow is one verdict reason's counters.
type CounterRow struct {
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// MapRow is a sessions map's fill.
type MapRow struct {
	// Family is FamilyIPv4 or FamilyIPv6.
	Family   string `json:"family"`
	Entries  uint64 `json:"entries"`
	Capacity uint64 `json:"capacity"`
}

// Stats is what "aegisctl stats" shows.
type Stats struct {
	Counters []CounterRow `json:"counters"`
	Maps     []MapRow     `json:"maps"`
	// AllowRules are the static allow rules with the packets each
	// admitted; AllowUnnumbered the packets of rules without a counter of
	// their own (past the 255th of a family).
	AllowRules      []AllowRuleRow `json:"allow_rules,omitempty"`
	AllowUnnumbered uint64         `json:"allow_unnumbered,omitempty"`
}

// AllowRuleRow is one allow rule's hit counter.
type AllowRuleRow struct {
	// Rule is spelled as aegis-loader --allow takes it.
	Rule string `json:"rule"`
	// ID is the rule's counter within its family (the rule_id label of
	// aegis_datapath_allow_rule_packets_total); 0 for none of its own.
	ID      uint8  `json:"id"`
	Packets uint64 `json:"packets"`
}

func sortSessions(rows []SessionRow) {
	slices.SortFunc(rows, func(a, b SessionRow) int {
		return cmp.Or(strings.Compare(a.User, b.User), a.Source.Compare(b.Source),
			a.Dest.Addr().Compare(b.Dest.Addr()), cmp.Compare(a.Dest.Port(), b.Dest.Port()),
			strings.Compare(a.Protocol, b.Protocol))
	})
}

// WriteSessions prints sessions as an aligned table, sorted by user, then
// source, destination and protocol. A user that is not printable text
// (state.Escape) is printed quoted and escaped: a name written into the
// maps by some other tool must not add a row or rewrite the terminal.
func WriteSessions(w io.Writer, rows []SessionRow, now time.Time) error {
	sortSessions(rows)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USER\tPROTO\tSOURCE\tDESTINATION\tIDLE\tLEFT\tLIFETIME\tSTATE")
	for _, r := range rows {
		lifetime := "-"
		if !r.Expires.IsZero() {
			lifetime = short(r.Expires.Sub(now))
		}
		condition := "active"
		if r.Expired {
			condition = "expired"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", state.Escape(r.User), state.Escape(r.Protocol), r.Source, r.Dest,
			short(now.Sub(r.LastSeen)), short(r.Left), lifetime, condition)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d session(s)\n", len(rows))
	return err
}

// WriteStats prints the verdict counters and the map fill as tables, names
// left-aligned and numbers right-aligned.
func WriteStats(w io.Writer, s Stats) error {
	rw, pw, bw := len("REASON"), len("PACKETS"), len("BYTES")
	for _, c := range s.Counters {
		rw = max(rw, len(c.Reason))
		pw = max(pw, len(fmt.Sprint(c.Packets)))
		bw = max(bw, len(fmt.Sprint(c.Bytes)))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-7s  %-*s  %*s  %*s\n", "VERDICT", rw, "REASON", pw, "PACKETS", bw, "BYTES")
	for _, c := range s.Counters {
		fmt.Fprintf(&b, "%-7s  %-*s  %*d  %*d\n", c.Verdict, rw, c.Reason, pw, c.Packets, bw, c.Bytes)
	}
	ew, cw := len("SESSIONS"), len("CAPACITY")
	for _, m := range s.Maps {
		ew = max(ew, len(fmt.Sprint(m.Entries)))
		cw = max(cw, len(fmt.Sprint(m.Capacity)))
	}
	fmt.Fprintf(&b, "\n%-11s  %*s  %*s  %6s\n", "MAP", ew, "SESSIONS", cw, "CAPACITY", "FILL")
	for _, m := range s.Maps {
		fill := 0.0
		if m.Capacity > 0 {
			fill = 100 * float64(m.Entries) / float64(m.Capacity)
		}
		fmt.Fprintf(&b, "%-11s  %*d  %*d  %5.1f%%\n", mapName(m.Family), ew, m.Entries, cw, m.Capacity, fill)
	}
	if len(s.AllowRules) > 0 {
		const unnumbered = "(rules without a counter)"
		aw, hw := len("ALLOW RULE"), len("HITS")
		for _, r := range s.AllowRules {
			aw, hw = max(aw, len(r.Rule)), max(hw, len(fmt.Sprint(r.Packets)))
		}
		if s.AllowUnnumbered > 0 {
			aw, hw = max(aw, len(unnumbered)), max(hw, len(fmt.Sprint(s.AllowUnnumbered)))
		}
		fmt.Fprintf(&b, "\n%-*s  %3s  %*s\n", aw, "ALLOW RULE", "ID", hw, "HITS")
		for _, r := range s.AllowRules {
			id, hits := "-", "-"
			if r.ID != 0 {
				id, hits = fmt.Sprint(r.ID), fmt.Sprint(r.Packets)
			}
			fmt.Fprintf(&b, "%-*s  %3s  %*s\n", aw, r.Rule, id, hw, hits)
		}
		if s.AllowUnnumbered > 0 {
			fmt.Fprintf(&b, "%-*s  %3s  %*d\n", aw, unnumbered, "0", hw, s.AllowUnnumbered)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// mapName is the sessions map of a family.
func mapName(family string) string {
	if family == FamilyIPv4 {
		return state.MapSessionsV4
	}
	return state.MapSessionsV6
}

// writeJSON prints v as indented JSON, with every character that is not
// printable escaped (escapeJSON).
func writeJSON(w io.Writer, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return err
	}
	_, err := w.Write(escapeJSON(buf.Bytes()))
	return err
}

// writeJSONLine prints v as JSON on one line, escaped as writeJSON's: a
// record of a newline-delimited stream.
func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(escapeJSON(b), '\n'))
	return err
}

// escapeJSON rewrites as \uXXXX every character of encoding/json's output
// that is not printable (unicode.IsPrint) and not the newline of its
// indentation. encoding/json escapes the C0 controls, U+2028 and U+2029,
// but writes C1 controls, bidi overrides and zero-width characters as
// they are, which a terminal obeys. Outside strings its output holds only
// ASCII punctuation, spaces and newlines, so every character rewritten is
// inside a string, and the value decodes unchanged. (Invalid UTF-8 was
// already replaced with U+FFFD by the encoder.)
func escapeJSON(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		switch {
		case r == '\n' || unicode.IsPrint(r):
			out = append(out, b[:size]...)
		case r > 0xffff:
			r1, r2 := utf16.EncodeRune(r)
			out = fmt.Appendf(out, `\u%04x\u%04x`, r1, r2)
		default:
			out = fmt.Appendf(out, `\u%04x`, r)
		}
		b = b[size:]
	}
	return out
}

// short formats a duration to the second, as an operator reads it:
// 45s, 3m12s, 2h5m, 3d4h.
func short(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	d = d.Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
}
