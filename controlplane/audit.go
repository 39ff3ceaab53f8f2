package controlplane

import (
	"unicode/utf8"

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
	// opCall is a request refused before its operation could be told:
	// it did not decode (decode.go).
	opCall = "call"
)

// target is what a refused request named, as it came. The JSON encoder
// quotes it, so a client cannot forge log fields, and clip escapes what
// the encoder leaves raw (C1 controls, bidi overrides), so that a log
// read on a terminal cannot rewrite it.
type target struct {
	src, dst, proto string
	port            uint32
}

// audit logs one grant, revoke or move as a single structured line (the
// message is the operation, field "audit" marks the line) and counts it.
// It names the session, its user, the peer's certificate identity and
// address, and the result; nothing secret. A refused request is logged at
// warn level with the reason. Addresses are appended into a stack buffer:
// this runs once per grant.
func (s *Server) audit(op, api string, p *peerInfo, user string, k *state.Key, result string, err error) {
	s.auditGrant(op, api, p, user, "", k, result, err)
}

// auditGrant is audit for a grant that found another user's session at
// the key: previous is that user, logged as previous_user (see claim).
func (s *Server) auditGrant(op, api string, p *peerInfo, user, previous string, k *state.Key, result string, err error) {
	ev := s.auditEvent(op, api, user, result, err)
	if ev == nil {
		return
	}
	if previous != "" {
		ev = ev.Str("previous_user", state.Escape(previous))
	}
	if k != nil {
		var buf [64]byte
		if k.Proto != 0 || k.Port != 0 { // a session key: protocol 0 is any
			ev = ev.Str("proto", k.Proto.String())
		}
		if k.Src.IsValid() {
			ev = ev.Bytes("src", k.Src.AppendTo(buf[:0]))
		}
		if k.Dst.IsValid() {
			ev = ev.Bytes("dst", k.Dst.AppendTo(buf[:0]))
		}
		if k.Port != 0 {
			ev = ev.Uint16("dport", k.Port)
		}
	}
	s.auditDone(ev, p, op, result)
}

// auditTarget is audit for a request refused before it named a valid key.
// The fields are the client's and may be anything: they are cut short.
func (s *Server) auditTarget(op, api string, p *peerInfo, user string, t *target, result string, err error) {
	ev := s.auditEvent(op, api, user, result, err)
	if ev == nil {
		return
	}
	if t.proto != "" {
		ev = ev.Str("proto", clip(t.proto))
	}
	if t.src != "" {
		ev = ev.Str("src", clip(t.src))
	}
	if t.dst != "" {
		ev = ev.Str("dst", clip(t.dst))
	}
	if t.port != 0 {
		ev = ev.Uint32("dport", t.port)
	}
	s.auditDone(ev, p, op, result)
}

func (s *Server) auditEvent(op, api, user, result string, err error) *zerolog.Event {
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
		return nil // level disabled
	}
	ev = ev.Str("audit", op)
	if api != "" {
		ev = ev.Str("api", api)
	}
	if user != "" {
		ev = ev.Str("user", clip(user))
	}
	return ev
}

func (s *Server) auditDone(ev *zerolog.Event, p *peerInfo, op, result string) {
	var buf [64]byte
	ev.Str("peer", p.identity()).Bytes("peer_address", p.appendAddr(buf[:0])).Str("result", result).Msg(op)
}

// maxLogged is the most of a client-supplied string an audit line or an
// error carries: enough for any valid value, little for a hostile one.
const maxLogged = 64

// cut cuts s to maxLogged bytes, at a character boundary, marking the cut
// with "...". For errors, which quote it with %q.
func cut(s string) string {
	if len(s) <= maxLogged {
		return s
	}
	n := maxLogged
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// clip is cut for a log field: also escaped (state.Escape) unless
// printable. A valid user passes unchanged, without an allocation.
func clip(s string) string {
	return state.Escape(cut(s))
}
