package aegisctl

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/cli"
	"github.com/aegis-agent/aegis/internal/state"
)

// LocalCmd reads the pinned maps directly: for an operator on the gateway,
// as root, when the control plane is down or not to be trusted.
type LocalCmd struct {
	PinPath  string           `default:"${pin_path}" env:"AEGISCTL_PIN_PATH" placeholder:"DIR" help:"bpffs directory holding the pinned maps."`
	Sessions LocalSessionsCmd `cmd:"" help:"List the sessions in the pinned maps."`
	Stats    LocalStatsCmd    `cmd:"" help:"Show the data path's verdict counters and map fill."`
	Explain  LocalExplainCmd  `cmd:"" help:"Say what the data path would do with a packet and why, from the pinned maps, changing nothing."`
}

// LocalSessionsCmd is "aegisctl local sessions".
type LocalSessionsCmd struct {
	User string `short:"u" help:"Only this user's sessions."`
	Src  string `placeholder:"IP" help:"Only sessions from this client address."`
	Dst  string `placeholder:"IP" help:"Only sessions to this service address."`
	Port uint16 `help:"Only sessions to this service port."`
	JSON bool   `name:"json" help:"Print JSON."`
}

// filter returns the test a session must pass: the filters of the remote
// "sessions" command, applied to the maps.
func (cmd *LocalSessionsCmd) filter() (func(*state.Session) bool, error) {
	var src, dst netip.Addr
	for _, f := range []struct {
		flag, v string
		a       *netip.Addr
	}{{"--src", cmd.Src, &src}, {"--dst", cmd.Dst, &dst}} {
		if f.v == "" {
			continue
		}
		a, err := netip.ParseAddr(f.v)
		if err != nil {
			return nil, &cli.UsageError{Err: fmt.Errorf("%s %q: %w: not an IPv4 or IPv6 address", f.flag, f.v, state.ErrInvalid)}
		}
		*f.a = a.Unmap()
	}
	return func(s *state.Session) bool {
		return (cmd.User == "" || s.User == cmd.User) &&
			(!src.IsValid() || s.Src == src) &&
			(!dst.IsValid() || s.Dst == dst) &&
			(cmd.Port == 0 || s.Port == cmd.Port)
	}, nil
}

// LocalStatsCmd is "aegisctl local stats".
type LocalStatsCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

func openLocal(pinPath string) (*state.Maps, error) {
	m, err := state.Open(pinPath, state.OpenOptions{})
	if err != nil {
		return nil, fmt.Errorf("read the pinned maps (this needs root or CAP_BPF on the gateway): %w", err)
	}
	return m, nil
}

// Run lists the sessions.
func (cmd *LocalSessionsCmd) Run(parent *LocalCmd, stdio cli.IO) error {
	keep, err := cmd.filter()
	if err != nil {
		return err
	}
	m, err := openLocal(parent.PinPath)
	if err != nil {
		return err
	}
	defer m.Close()
	rows, err := localSessions(m, keep)
	if err != nil {
		return err
	}
	if cmd.JSON {
		sortSessions(rows)
		return writeJSON(stdio.Stdout, rows)
	}
	return WriteSessions(stdio.Stdout, rows, time.Now())
}

func localSessions(m *state.Maps, keep func(*state.Session) bool) ([]SessionRow, error) {
	cfg, err := m.ReadConfig()
	if err != nil {
		return nil, err
	}
	now := state.Now()
	rows := []SessionRow{}
	for s, err := range m.Sessions() {
		if err != nil {
			return nil, err
		}
		if keep != nil && !keep(&s) {
			continue
		}
		rows = append(rows, rowFromState(&s, cfg.DefaultIdleTimeout, now))
	}
	return rows, nil
}

// rowFromState converts a session read from the maps; now is the data
// path's clock.
func rowFromState(s *state.Session, defaultIdle time.Duration, now uint64) SessionRow {
	idle := s.IdleTimeout
	if idle == 0 {
		idle = defaultIdle
	}
	r := SessionRow{
		User:        s.User,
		Protocol:    s.Proto.String(),
		Source:      s.Src,
		Dest:        netip.AddrPortFrom(s.Dst, s.Port),
		Created:     state.WallTime(s.Created),
		LastSeen:    state.WallTime(s.LastSeen),
		IdleTimeout: idle,
		Left:        s.TimeLeft(defaultIdle, now),
		Expired:     s.Verdict(defaultIdle, now) != bpf.ReasonSession,
	}
	if s.Expires != 0 {
		r.Expires = state.WallTime(s.Expires)
	}
	if r.Expired {
		r.Left = 0
	}
	return r
}

// Run shows the counters.
func (cmd *LocalStatsCmd) Run(parent *LocalCmd, stdio cli.IO) error {
	m, err := openLocal(parent.PinPath)
	if err != nil {
		return err
	}
	defer m.Close()
	st, err := localStats(m)
	if err != nil {
		return err
	}
	if cmd.JSON {
		return writeJSON(stdio.Stdout, st)
	}
	return WriteStats(stdio.Stdout, st)
}

func localStats(m *state.Maps) (Stats, error) {
	counters, err := m.ReadStats()
	if err != nil {
		return Stats{}, err
	}
	var st Stats
	for _, r := range state.Reasons {
		st.Counters = append(st.Counters, CounterRow{Verdict: r.Verdict(), Reason: r.String(),
			Packets: counters[r].Packets, Bytes: counters[r].Bytes})
	}
	v4, v6, err := m.Count()
	if err != nil {
		return Stats{}, err
	}
	st.Maps = []MapRow{
		{Family: FamilyIPv4, Entries: uint64(v4), Capacity: uint64(m.SessionsV4.MaxEntries())},
		{Family: FamilyIPv6, Entries: uint64(v6), Capacity: uint64(m.SessionsV6.MaxEntries())},
	}
	hits, err := state.ReadAllowHits(m)
	if err != nil {
		return Stats{}, err
	}
	for _, h := range hits.Rules {
		st.AllowRules = append(st.AllowRules, AllowRuleRow{Rule: state.FormatAllowRule(h.Rule), ID: h.ID, Packets: h.Packets})
	}
	st.AllowUnnumbered = hits.Unnumbered[0] + hits.Unnumbered[1]
	return st, nil
}
