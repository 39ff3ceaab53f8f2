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

// target is the session an audit line names: a key, or for a malformed
// request the fields as they came (quoted by the JSON encoder, so a client
// cannot forge log fields).
type target struct {
	src, dst, proto string
	port            uint32
}

func keyTarget(k *state.Key) *target {
	if k == nil {
		return nil
	}
	t := &target{port: uint32(k.Port)}
	if k.Src.IsValid() {
		t.src = k.Src.String()
	}
	if k.Dst.IsValid() {
		t.dst = k.Dst.String()
	}
	if k.Proto != 0 {
		t.proto = k.Proto.String()
	}
	return t
}

// audit logs one grant, revoke or move as a single structured line (the
// message is the operation, field "audit" marks the line) and counts it.
// It names the session, its user, the peer's certificate identity and
// address, and the result; nothing secret. A refused request is logged at
// warn level with the reason.
func (s *Server) audit(op, api string, p *peerInfo, user string, k *state.Key, result string, err error) {
	s.auditTarget(op, api, p, user, keyTarget(k), result, err)
}

func (s *Server) auditTarget(op, api string, p *peerInfo, user string, k *target, result string, err error) {
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
		if k.proto != "" {
			ev = ev.Str("proto", k.proto)
		}
		if k.src != "" {
			ev = ev.Str("src", k.src)
		}
		if k.dst != "" {
			ev = ev.Str("dst", k.dst)
		}
		if k.port != 0 {
			ev = ev.Uint32("port", k.port)
		}
	}
	ev.Str("peer", p.identity()).Str("peer_addr", p.addr).Str("result", result).Msg(op)
}
