package controlplane

import (
	"github.com/rs/zerolog"

	"github.com/aegis-agent/aegis/internal/state"
)

// The APIs a change came through, as metrics labels and in the audit log.
const (
	apiCompat = "compat" // session.SessionManager
	apiAgent  = "agent"  // aegis.agent.v1.AgentService
)

// Audit operations.
const (
	opGrant  = "grant"
	opRevoke = "revoke"
	opMove   = "move"
)

// audit logs one grant, revoke or move as a single structured line (the
// message is the operation, field "audit" marks the line) and counts it.
// It names the session, its user, the peer's certificate identity and
// address, and the result; nothing secret. A refused request is logged at
// warn level with the reason.
func (s *Server) audit(op, api string, p *peerInfo, user string, k *state.Key, result string, err error) {
	switch op {
	case opGrant:
		s.m.grant(api, result)
	case opRevoke:
		s.m.revoke(api, result)
	}
	var ev *zerolog.Event
	if err != nil && result != resultNotFound {
		ev = s.log.Warn().Err(err)
	} else {
		ev = s.log.Info()
	}
	if ev == nil {
		return // level disabled
	}
	ev = ev.Str("audit", op).Str("api", api)
	if user != "" {
		ev = ev.Str("user", user)
	}
	if k != nil {
		if k.Proto != 0 {
			ev = ev.Str("proto", k.Proto.String())
		}
		if k.Src.IsValid() {
			ev = ev.Str("src", k.Src.String())
		}
		if k.Dst.IsValid() {
			ev = ev.Str("dst", k.Dst.String())
		}
		if k.Port != 0 {
			ev = ev.Uint16("port", k.Port)
		}
	}
	ev.Str("peer", p.identity()).Str("peer_addr", p.addr).Str("result", result).Msg(op)
}
