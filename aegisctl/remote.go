package aegisctl

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// callError turns a gRPC error into one readable line.
func callError(op, addr string, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: %w", op, err)
	}
	if st.Code() == codes.Unavailable && strings.Contains(st.Message(), "connection") {
		return fmt.Errorf("%s: cannot reach the control plane at %s: %s", op, addr, st.Message())
	}
	return fmt.Errorf("%s: %s: %s", op, st.Code(), state.Escape(st.Message()))
}

func protocol(s string) (agentv1.Protocol, error) {
	switch strings.ToLower(s) {
	case "", "tcp":
		return agentv1.Protocol_PROTOCOL_TCP, nil
	case "udp":
		return agentv1.Protocol_PROTOCOL_UDP, nil
	case "any":
		return agentv1.Protocol_PROTOCOL_ANY, nil
	}
	return 0, &cli.UsageError{Err: fmt.Errorf("--proto %q: want tcp, udp or any", s)}
}

func protocolName(p agentv1.Protocol) string {
	switch p {
	case agentv1.Protocol_PROTOCOL_UDP:
		return "udp"
	case agentv1.Protocol_PROTOCOL_ANY:
		return "any"
	}
	return "tcp"
}

// LoginCmd is "aegisctl login".
type LoginCmd struct {
	Conn        `embed:""`
	User        string        `short:"u" required:"" placeholder:"NAME" help:"User the session belongs to: 1-31 bytes of printable text."`
	Src         string        `required:"" placeholder:"IP" help:"Client (source) address."`
	Dst         string        `required:"" placeholder:"IP" help:"Service (destination) address."`
	Port        uint32        `required:"" placeholder:"PORT" help:"Service (destination) port."`
	Proto       string        `default:"tcp" enum:"tcp,udp,any" help:"Protocol: tcp, udp, or any (TCP and UDP as one session with one idle timer)."`
	IdleTimeout time.Duration `help:"Idle timeout; 0 for the gateway's default (aegis-loader --rule-timeout)."`
	MaxLifetime time.Duration `help:"Longest the session may last; 0 for no limit."`
	JSON        bool          `name:"json" help:"Print JSON: result (created or refreshed) and the session, in the fields of sessions --json."`
}

// Run grants the session.
func (cmd *LoginCmd) Run(ctx context.Context, stdio cli.IO) error {
	proto, err := protocol(cmd.Proto)
	if err != nil {
		return err
	}
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	req := &agentv1.LoginEventRequest{User: cmd.User, SrcIp: cmd.Src, DstIp: cmd.Dst, DstPort: cmd.Port, Protocol: proto}
	if cmd.IdleTimeout != 0 {
		req.IdleTimeout = durationpb.New(cmd.IdleTimeout)
	}
	if cmd.MaxLifetime != 0 {
		req.MaxLifetime = durationpb.New(cmd.MaxLifetime)
	}
	c, cancel := cmd.ctx(ctx)
	defer cancel()
	resp, err := client.LoginEvent(c, req)
	if err != nil {
		return callError("login", cmd.Address, err)
	}
	s := resp.GetSession()
	if cmd.JSON {
		g := Grant{Result: ResultRefreshed, Session: rowFromProto(s)}
		if resp.GetCreated() {
			g.Result = ResultCreated
		}
		return writeJSON(stdio.Stdout, g)
	}
	what := "refreshed"
	if resp.GetCreated() {
		what = "granted"
	}
	lifetime := "no lifetime limit"
	if s.GetExpireTime() != nil {
		lifetime = "lifetime ends " + s.GetExpireTime().AsTime().Local().Format(time.DateTime)
	}
	fmt.Fprintf(stdio.Stdout, "%s: %s %s %s -> %s, idle timeout %v, %s\n", what, state.Escape(s.GetUser()), protocolName(s.GetProtocol()),
		state.Escape(s.GetSrcIp()), state.Escape(hostPort(s.GetDstIp(), s.GetDstPort())), s.GetIdleTimeout().AsDuration(), lifetime)
	return nil
}

func hostPort(addr string, port uint32) string {
	if a, err := netip.ParseAddr(addr); err == nil {
		return netip.AddrPortFrom(a, uint16(port)).String()
	}
	return fmt.Sprintf("%s:%d", addr, port)
}

// LogoutCmd is "aegisctl logout".
type LogoutCmd struct {
	Conn  `embed:""`
	User  string `short:"u" help:"Revoke every session of this user, or (with a key) check the session is theirs."`
	Src   string `placeholder:"IP" help:"Client address of the one session to revoke."`
	Dst   string `placeholder:"IP" help:"Service address of the one session to revoke."`
	Port  uint32 `help:"Service port of the one session to revoke."`
	Proto string `default:"tcp" enum:"tcp,udp,any" help:"Protocol of the one session to revoke: tcp, udp or any."`
	JSON  bool   `name:"json" help:"Print JSON: result (revoked or not_found), revoked (how many), and the user and session key asked for."`
}

// Run revokes.
func (cmd *LogoutCmd) Run(ctx context.Context, stdio cli.IO) error {
	keyed := cmd.Src != "" || cmd.Dst != "" || cmd.Port != 0
	if !keyed && cmd.User == "" {
		return &cli.UsageError{Err: fmt.Errorf("name a --user, or a session with --src, --dst and --port")}
	}
	if keyed && (cmd.Src == "" || cmd.Dst == "" || cmd.Port == 0) {
		return &cli.UsageError{Err: fmt.Errorf("a session needs all of --src, --dst and --port")}
	}
	req := &agentv1.LogoutEventRequest{User: cmd.User}
	if keyed {
		proto, err := protocol(cmd.Proto)
		if err != nil {
			return err
		}
		req.SrcIp, req.DstIp, req.DstPort, req.Protocol = cmd.Src, cmd.Dst, cmd.Port, proto
	}
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	c, cancel := cmd.ctx(ctx)
	defer cancel()
	resp, err := client.LogoutEvent(c, req)
	if err != nil {
		return callError("logout", cmd.Address, err)
	}
	if cmd.JSON {
		r := Revocation{Result: ResultRevoked, Revoked: resp.GetRevoked(), User: cmd.User}
		if r.Revoked == 0 {
			r.Result = ResultNotFound
		}
		if keyed {
			r.Proto, r.Src, r.Dst, r.Dport = protocolName(req.GetProtocol()), cmd.Src, cmd.Dst, cmd.Port
			if a, err := netip.ParseAddr(cmd.Src); err == nil {
				r.Family = family(a)
			}
		}
		return writeJSON(stdio.Stdout, r)
	}
	fmt.Fprintf(stdio.Stdout, "revoked %d session(s)\n", resp.GetRevoked())
	return nil
}

// SessionsCmd is "aegisctl sessions".
type SessionsCmd struct {
	Conn  `embed:""`
	User  string `short:"u" help:"Only this user's sessions."`
	Src   string `placeholder:"IP" help:"Only sessions from this client address."`
	Dst   string `placeholder:"IP" help:"Only sessions to this service address."`
	Port  uint32 `help:"Only sessions to this service port."`
	Limit uint32 `help:"At most this many sessions; 0 for all."`
	JSON  bool   `name:"json" help:"Print JSON."`
}

func (cmd *SessionsCmd) request() *agentv1.ListSessionsRequest {
	return &agentv1.ListSessionsRequest{User: cmd.User, SrcIp: cmd.Src, DstIp: cmd.Dst, DstPort: cmd.Port}
}

// Run lists.
func (cmd *SessionsCmd) Run(ctx context.Context, stdio cli.IO) error {
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	rows, matched, err := listSessions(ctx, &cmd.Conn, client, cmd.request(), int(cmd.Limit))
	if err != nil {
		return err
	}
	if cmd.JSON {
		sortSessions(rows)
		return writeJSON(stdio.Stdout, rows)
	}
	if err := WriteSessions(stdio.Stdout, rows, time.Now()); err != nil {
		return err
	}
	if matched > uint64(len(rows)) {
		fmt.Fprintf(stdio.Stdout, "%d more not shown (--limit)\n", matched-uint64(len(rows)))
	}
	return nil
}

// listPageSize is the page size aegisctl asks for: the server's largest,
// so that a full map takes few round trips.
const listPageSize = 10000

// listSessions lists the sessions req matches, following the pages, at
// most limit of them (0 for all). It also returns how many matched.
func listSessions(ctx context.Context, conn *Conn, client agentv1.AgentServiceClient, req *agentv1.ListSessionsRequest, limit int) ([]SessionRow, uint64, error) {
	rows := []SessionRow{} // none is [] in JSON, as local sessions prints it, not null
	var matched uint64
	req.PageSize = listPageSize
	if limit > 0 {
		req.PageSize = uint32(min(limit, listPageSize))
	}
	for {
		// Each page gets the call timeout of its own.
		resp, err := func() (*agentv1.ListSessionsResponse, error) {
			c, cancel := conn.ctx(ctx)
			defer cancel()
			return client.ListSessions(c, req)
		}()
		if err != nil {
			return nil, 0, callError("list sessions", conn.Address, err)
		}
		for _, s := range resp.GetSessions() {
			rows = append(rows, rowFromProto(s))
		}
		matched = resp.GetMatched()
		if limit > 0 && len(rows) >= limit {
			return rows[:limit], matched, nil
		}
		if resp.GetNextPageToken() == "" {
			return rows, matched, nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

func rowFromProto(s *agentv1.Session) SessionRow {
	src, _ := netip.ParseAddr(s.GetSrcIp())
	dst, _ := netip.ParseAddr(s.GetDstIp())
	r := SessionRow{
		User:        s.GetUser(),
		Protocol:    protocolName(s.GetProtocol()),
		Source:      src,
		Dest:        netip.AddrPortFrom(dst, uint16(s.GetDstPort())),
		Created:     s.GetCreateTime().AsTime(),
		LastSeen:    s.GetLastSeenTime().AsTime(),
		IdleTimeout: s.GetIdleTimeout().AsDuration(),
		Left:        s.GetTimeLeft().AsDuration(),
		Expired:     s.GetExpired(),
	}
	if s.GetExpireTime() != nil {
		r.Expires = s.GetExpireTime().AsTime()
	}
	return r
}

// StatsCmd is "aegisctl stats".
type StatsCmd struct {
	Conn `embed:""`
	JSON bool `name:"json" help:"Print JSON."`
}

// Run shows the counters.
func (cmd *StatsCmd) Run(ctx context.Context, stdio cli.IO) error {
	client, done, err := cmd.agent()
	if err != nil {
		return err
	}
	defer done()
	st, err := getStats(ctx, &cmd.Conn, client)
	if err != nil {
		return err
	}
	if cmd.JSON {
		return writeJSON(stdio.Stdout, st)
	}
	return WriteStats(stdio.Stdout, st)
}

func getStats(ctx context.Context, conn *Conn, client agentv1.AgentServiceClient) (Stats, error) {
	c, cancel := conn.ctx(ctx)
	defer cancel()
	resp, err := client.GetStats(c, &agentv1.GetStatsRequest{})
	if err != nil {
		return Stats{}, callError("get stats", conn.Address, err)
	}
	var st Stats
	for _, v := range resp.GetCounters() {
		st.Counters = append(st.Counters, CounterRow{Verdict: v.GetVerdict(), Reason: v.GetReason(), Packets: v.GetPackets(), Bytes: v.GetBytes()})
	}
	st.Maps = []MapRow{
		{Family: FamilyIPv4, Entries: resp.GetSessionsV4().GetEntries(), Capacity: resp.GetSessionsV4().GetCapacity()},
		{Family: FamilyIPv6, Entries: resp.GetSessionsV6().GetEntries(), Capacity: resp.GetSessionsV6().GetCapacity()},
	}
	for _, r := range resp.GetAllowRules() {
		st.AllowRules = append(st.AllowRules, AllowRuleRow{Rule: r.GetRule(), ID: uint8(r.GetId()), Packets: r.GetPackets()})
	}
	st.AllowUnnumbered = resp.GetAllowUnnumberedPackets()
	return st, nil
}
