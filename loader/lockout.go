package loader

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/explain"
	"github.com/aegis-agent/aegis/internal/state"
)

// The lock-out check: before a load makes an interface default-drop, it
// asks whether the operator's own connection to this host, and the default
// route's next hop, would still get through. "Would get through" is not
// re-implemented here: the packet is built and handed to the data path's
// reference model (bpf.Verdict) with the config being loaded and the
// sessions already pinned, so the check and the filter agree by
// construction. Only ingress matters: XDP sees the packets that arrive on
// the interface, so a connection is cut when the interface its peer is
// routed through is filtered and the peer's packets are dropped.

// Finding severities.
const (
	// SeverityRefuse: the load would cut the operator's session; it is
	// refused unless --no-lockout-check is given.
	SeverityRefuse = "refuse"
	// SeverityWarn: something this host needs would be dropped, but not
	// the session the load runs in.
	SeverityWarn = "warn"
	// SeverityOK: checked, and it passes.
	SeverityOK = "ok"
)

// Finding is one result of the lock-out check.
type Finding struct {
	Severity string `json:"severity"`
	Iface    string `json:"iface,omitempty"`
	// What names the traffic checked: "ssh session" or "default gateway".
	What string `json:"what"`
	// Source says how it was found: SSH_CONNECTION, SSH_CLIENT, the
	// sockets of an sshd ancestor, or the routing table.
	Source string `json:"source"`
	Src    string `json:"src"`
	Dst    string `json:"dst"`
	Dport  uint16 `json:"dport"`
	Proto  string `json:"proto"`
	// Verdict is what the data path would give the traffic's packets:
	// "pass" or "drop", with the counter's reason.
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// Connection is a TCP connection this host terminates: Peer is the remote
// end, Local this host's address and port.
type Connection struct {
	Peer, Local netip.AddrPort
	// Source says how it was found.
	Source string
}

// lockoutEnv is what a check evaluates against: the config and allow
// rules being loaded, and read access to the pinned sessions.
type lockoutEnv struct {
	value    bpf.AegisConfigValue
	allow    state.AllowEntries
	sessions func(key state.Key) *bpf.AegisSessionValue
	local    func(netip.Addr) bool
}

// modelVerdict builds one TCP segment from src to dst as it would arrive on
// the wire and asks the data path's reference model for its verdict. It is
// the only place the lock-out check decides what passes.
func modelVerdict(src, dst netip.AddrPort, env *lockoutEnv) (bpf.Action, bpf.Reason) {
	m := &bpf.Env{
		Config:     env.value,
		Now:        state.Now(),
		SessionsV4: map[bpf.AegisSessionKeyV4]*bpf.AegisSessionValue{},
		SessionsV6: map[bpf.AegisSessionKeyV6]*bpf.AegisSessionValue{},
		AllowV4:    env.allow.V4,
		AllowV6:    env.allow.V6,
		Local:      env.local,
	}
	// The sessions that could match this packet: its exact key, and the
	// any-protocol key (protocol 0) that compat grants use.
	for _, proto := range []state.Protocol{state.TCP, 0} {
		k := state.Key{Src: src.Addr(), Dst: dst.Addr(), Port: dst.Port(), Proto: proto}
		v := env.sessions(k)
		if v == nil {
			continue
		}
		if src.Addr().Is4() {
			m.SessionsV4[bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(proto)}] = v
		} else {
			m.SessionsV6[bpf.AegisSessionKeyV6{Src: k.Src.As16(), Dst: k.Dst.As16(), Dport: k.Port, Proto: uint8(proto)}] = v
		}
	}
	// The ingress verdict reads no TCP flag: the flow's first segment
	// stands for every segment of the connection.
	frame, err := explain.Flow{Src: src.Addr(), Dst: dst.Addr(), Sport: src.Port(), Port: dst.Port()}.Frame()
	if err != nil {
		return bpf.XDPDrop, bpf.ReasonMalformed // no such connection can arrive
	}
	// Monitor mode passes what it counts as "monitor": it cuts nothing.
	return bpf.Verdict(frame, m)
}

// newLockoutEnv prepares the check for cfg. The pinned sessions maps, if
// any, are opened read-only; nothing is created.
func newLockoutEnv(cfg *Config, allow state.AllowEntries) (*lockoutEnv, func(), error) {
	c := state.Config{
		Controller:         cfg.Controller,
		ControllerPort:     cfg.ControllerPort,
		GRPCPort:           cfg.GRPCPort,
		DefaultIdleTimeout: cfg.RuleTimeout,
		Monitor:            cfg.Monitor,
		AllowV4Prefixes:    uint16(len(allow.V4)),
		AllowV6Prefixes:    uint16(len(allow.V6)),
	}
	v, err := c.Value()
	if err != nil {
		return nil, nil, err
	}
	env := &lockoutEnv{value: v, allow: allow, local: explain.RoutedLocally}
	var maps []*ebpf.Map
	open := func(name string) *ebpf.Map {
		m, err := ebpf.LoadPinnedMap(state.MapPath(cfg.PinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil // not pinned yet, or not ours to read: no sessions
		}
		maps = append(maps, m)
		return m
	}
	v4, v6 := open(state.MapSessionsV4), open(state.MapSessionsV6)
	env.sessions = func(k state.Key) *bpf.AegisSessionValue {
		var val bpf.AegisSessionValue
		var err error
		switch {
		case k.Src.Is4() && v4 != nil:
			err = v4.Lookup(&bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(k.Proto)}, &val)
		case k.Src.Is6() && v6 != nil:
			err = v6.Lookup(&bpf.AegisSessionKeyV6{Src: k.Src.As16(), Dst: k.Dst.As16(), Dport: k.Port, Proto: uint8(k.Proto)}, &val)
		default:
			return nil
		}
		if err != nil {
			return nil
		}
		return &val
	}
	closeAll := func() {
		for _, m := range maps {
			m.Close()
		}
	}
	return env, closeAll, nil
}

// routeIface returns the interface the host routes peer through: the
// interface the peer's packets arrive on, routing being symmetric. 0 if
// there is no route.
func routeIface(peer netip.Addr) int {
	routes, err := routeGet(peer)
	if err != nil || len(routes) == 0 {
		return 0
	}
	return routes[0].LinkIndex
}

func routeGet(a netip.Addr) ([]netlink.Route, error) { return netlink.RouteGet(a.AsSlice()) }

// guard runs the lock-out check for a load of cfg onto ifaces and the
// interfaces already attached (the config map is shared: a new config
// applies to them too). It returns the findings, and an error wrapping
// ErrLockout when one refuses the load and cfg does not skip the check.
func (l *Loader) guard(cfg *Config, allow state.AllowEntries, ifaces map[string]int) ([]Finding, error) {
	all := maps.Clone(ifaces)
	linked, _ := state.LinkedInterfaces(cfg.PinPath)
	for _, name := range linked {
		if _, ok := all[name]; ok {
			continue
		}
		if iface, err := net.InterfaceByName(name); err == nil {
			all[name] = iface.Index
		}
	}
	findings, err := l.checkLockout(cfg, allow, all)
	if err != nil {
		return nil, fmt.Errorf("check for lock-out: %w", err)
	}
	for _, f := range findings {
		switch {
		case f.Severity == SeverityWarn, f.Severity == SeverityRefuse && cfg.NoLockoutCheck:
			l.Log.Warn().Str("iface", f.Iface).Str("src", f.Src).Str("dst", f.Dst).Str("verdict", f.Verdict).
				Str("reason", f.Reason).Msg(f.Message)
		case f.Severity == SeverityOK:
			l.Log.Debug().Str("iface", f.Iface).Str("src", f.Src).Str("dst", f.Dst).Msg(f.Message)
		}
	}
	if cfg.NoLockoutCheck {
		return findings, nil
	}
	return findings, lockoutError(findings)
}

// checkLockout evaluates the operator's connections and the default
// routes against the config being loaded, for every interface the filter
// will run on after the load (ifaces: name to index).
func (l *Loader) checkLockout(cfg *Config, allow state.AllowEntries, ifaces map[string]int) ([]Finding, error) {
	env, done, err := newLockoutEnv(cfg, allow)
	if err != nil {
		return nil, err
	}
	defer done()
	byIndex := make(map[int]string, len(ifaces))
	for name, idx := range ifaces {
		byIndex[idx] = name
	}
	conns, err := l.OperatorConnections()
	if err != nil {
		l.Log.Warn().Err(err).Msg("cannot tell which connection this aegis-loader runs under; the lock-out check covers only SSH_CONNECTION")
	}

	var out []Finding
	for _, c := range conns {
		name, filtered := byIndex[routeIface(c.Peer.Addr())]
		if !filtered {
			continue
		}
		f := Finding{What: "ssh session", Source: c.Source, Iface: name, Src: c.Peer.String(),
			Dst: c.Local.String(), Dport: c.Local.Port(), Proto: "tcp"}
		action, reason := modelVerdict(c.Peer, c.Local, env)
		f.Verdict, f.Reason = action.Verdict(), reason.String()
		if action == bpf.XDPPass {
			f.Severity = SeverityOK
			f.Message = fmt.Sprintf("the session from %s arrives through %s and passes (%s)", c.Peer, name, reason)
		} else {
			f.Severity = SeverityRefuse
			f.Message = fmt.Sprintf("the session from %s to %s (found in %s) arrives through %s and the filter would drop it (%s): add --allow %s,tcp/%d (or a management prefix that covers it), or load with --monitor first; --no-lockout-check loads anyway, best with --confirm-within to roll back",
				c.Peer, c.Local, c.Source, name, reason, netip.PrefixFrom(c.Peer.Addr(), c.Peer.Addr().BitLen()), c.Local.Port())
		}
		out = append(out, f)
	}

	for _, gw := range defaultGateways() {
		name, filtered := byIndex[gw.ifindex]
		if !filtered || !gw.local.IsValid() {
			continue
		}
		// A reply to one of this host's own connections: what it gets from
		// upstream when it resolves names, syncs time or fetches updates.
		src := netip.AddrPortFrom(gw.nexthop, 443)
		dst := netip.AddrPortFrom(gw.local, 49152)
		action, reason := modelVerdict(src, dst, env)
		f := Finding{What: "default gateway", Source: "routing table", Iface: name, Src: src.String(), Dst: dst.String(),
			Dport: dst.Port(), Proto: "tcp", Verdict: action.Verdict(), Reason: reason.String()}
		if action == bpf.XDPPass {
			f.Severity = SeverityOK
			f.Message = fmt.Sprintf("the default route's next hop %s on %s passes (%s)", gw.nexthop, name, reason)
		} else {
			f.Severity = SeverityWarn
			f.Message = fmt.Sprintf("the default route's next hop %s is on %s and its packets to this host would be dropped (%s): this host's own outbound connections (DNS, NTP, updates) will get no replies; add --allow %s if it needs them",
				gw.nexthop, name, reason, netip.PrefixFrom(gw.nexthop, gw.nexthop.BitLen()))
		}
		out = append(out, f)
	}
	return out, nil
}

type gateway struct {
	ifindex int
	nexthop netip.Addr
	local   netip.Addr // this host's address the next hop talks to
}

// defaultGateways lists the next hops of the IPv4 and IPv6 default routes.
func defaultGateways() []gateway {
	var out []gateway
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if r.Dst != nil && !isDefault(r) {
				continue
			}
			hops := []*netlink.NexthopInfo{{LinkIndex: r.LinkIndex, Gw: r.Gw}}
			if len(r.MultiPath) > 0 {
				hops = r.MultiPath
			}
			for _, h := range hops {
				nh, ok := netip.AddrFromSlice(h.Gw)
				if !ok {
					continue
				}
				nh = nh.Unmap()
				gw := gateway{ifindex: h.LinkIndex, nexthop: nh}
				if rs, err := netlink.RouteGet(h.Gw); err == nil && len(rs) > 0 {
					gw.local, _ = netip.AddrFromSlice(rs[0].Src)
					gw.local = gw.local.Unmap()
				}
				out = append(out, gw)
			}
		}
	}
	return out
}

func isDefault(r netlink.Route) bool {
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// refusals returns the findings that stop a load.
func refusals(fs []Finding) []Finding {
	return slices.DeleteFunc(slices.Clone(fs), func(f Finding) bool { return f.Severity != SeverityRefuse })
}

// lockoutError is the error of a refused load: every refusal's message.
func lockoutError(fs []Finding) error {
	r := refusals(fs)
	if len(r) == 0 {
		return nil
	}
	msg := r[0].Message
	for _, f := range r[1:] {
		msg += "; " + f.Message
	}
	return fmt.Errorf("%w: %s", ErrLockout, msg)
}
