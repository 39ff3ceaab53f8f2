package controlplane

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"

	"github.com/aegis-agent/aegis/internal/state"
	"github.com/aegis-agent/aegis/proto/session"
)

// compatService implements session.SessionManager, the original agent's
// API that the Aegis controller speaks. Its sessions are IPv4 only and
// have no protocol: a grant is one any-protocol session (state.Any), which
// passes TCP and UDP with one idle timer, so that what the controller sees
// as one session expires as one. A revoke closes it, and also the TCP and
// UDP pair that versions before any-protocol sessions granted for the same
// request, so that an upgrade strands nothing the controller can no longer
// name.
type compatService struct {
	session.UnimplementedSessionManagerServer
	s *Server
}

// legacyKeys are the keys of the TCP and UDP pair an older version granted
// for the compat request of key.
func legacyKeys(key state.Key) [2]state.Key {
	tcp, udp := key, key
	tcp.Proto, udp.Proto = state.TCP, state.UDP
	return [2]state.Key{tcp, udp}
}

func (c *compatService) SubmitSession(ctx context.Context, ev *session.LoginEvent) (*session.Ack, error) {
	s := c.s
	p := peerOf(ctx)
	op := opRevoke
	if ev.GetActivate() {
		op = opGrant
	}
	user, userErr := compatUser(&p)
	src, dst, port, err := compatKey(ev)
	if err == nil && op == opGrant {
		// Only a grant records the user; a revoke by a client with an
		// unusable name still closes the session.
		err = userErr
	}
	if err != nil {
		s.auditTarget(op, apiCompat, &p, user, compatTarget(ev), resultInvalid, err)
		return nil, err
	}
	key := state.Key{Src: src, Dst: dst, Port: port, Proto: state.Any}
	if ev.GetActivate() {
		return c.grant(&p, user, key)
	}
	return c.revoke(&p, key)
}

// compatTarget describes the session a compat request names, as it came.
func compatTarget(ev *session.LoginEvent) *target {
	var src, dst [4]byte
	binary.BigEndian.PutUint32(src[:], ev.GetSrcIp())
	binary.BigEndian.PutUint32(dst[:], ev.GetDstIp())
	return &target{src: netip.AddrFrom4(src).String(), dst: netip.AddrFrom4(dst).String(), port: ev.GetDstPort(), proto: state.Any.String()}
}

func compatKey(ev *session.LoginEvent) (src, dst netip.Addr, port uint16, err error) {
	if src, err = compatAddr("src_ip", ev.GetSrcIp()); err != nil {
		return src, dst, port, err
	}
	if dst, err = compatAddr("dst_ip", ev.GetDstIp()); err != nil {
		return src, dst, port, err
	}
	port, err = parsePort("dst_port", ev.GetDstPort())
	return src, dst, port, err
}

// grant opens TCP and UDP as one any-protocol session. A live session of
// another user on the key refuses it (claim). A legacy TCP and UDP pair on
// the same tuple is left to its own timers: it passes no more than the new
// session does, and the next revoke closes it too.
func (c *compatService) grant(p *peerInfo, user string, key state.Key) (*session.Ack, error) {
	now := state.Now()
	_, _, _, err := c.s.grantClaimed(p, apiCompat, state.Session{Key: key, User: user, LastSeen: now, Created: now})
	c.s.mon.wrote()
	if err != nil {
		return nil, err
	}
	return &session.Ack{Success: true}, nil
}

// revoke closes the any-protocol session and a legacy pair on the same
// tuple. Revoking what is not there succeeds: the controller's intent, no
// access, holds. A legacy key that is not there is not audited: it is
// looked for on every revoke and absent after the first.
func (c *compatService) revoke(p *peerInfo, key state.Key) (*session.Ack, error) {
	s := c.s
	legacy := legacyKeys(key)
	keys := [3]state.Key{key, legacy[0], legacy[1]}
	var owners [3]string
	var errs [3]error
	var rev int64
	s.bulk.RLock()
	unlock := func() {}
	if s.sl != nil {
		unlock = s.keys.lock(keys[:]...)
	}
	revoke := func(m *state.Maps) error {
		for i, k := range keys {
			if old, err := m.Lookup(k); err == nil {
				owners[i] = old.User
			}
			errs[i] = m.Revoke(k)
		}
		return nil
	}
	var err error
	if s.sl != nil {
		deleted, own, r, serr := s.sl.revoke(keys[:], "")
		if errors.Is(serr, state.ErrNotFound) {
			serr = nil // nothing there: the controller's intent holds
		}
		rev, err = r, serr
		for i := range keys {
			owners[i] = own[i]
			if !deleted[i] {
				errs[i] = state.ErrNotFound
			}
		}
	} else {
		err = s.maps.Do(revoke)
	}
	unlock()
	s.bulk.RUnlock()
	s.sl.ack(rev, opRevoke)
	s.mon.wrote()
	if err != nil {
		err = statusOf(err)
		for i := range keys {
			s.audit(opRevoke, apiCompat, p, "", &keys[i], resultOf(err), err)
		}
		return nil, err
	}
	var failed error
	for i := range keys {
		switch {
		case errs[i] == nil:
			s.audit(opRevoke, apiCompat, p, owners[i], &keys[i], resultRevoked, nil)
		case errors.Is(errs[i], state.ErrNotFound):
			if i == 0 {
				s.audit(opRevoke, apiCompat, p, "", &keys[i], resultNotFound, nil)
			}
		default:
			failed = statusOf(errs[i])
			s.audit(opRevoke, apiCompat, p, owners[i], &keys[i], resultOf(failed), failed)
		}
	}
	if failed != nil {
		return nil, failed
	}
	return &session.Ack{Success: true}, nil
}

func (c *compatService) MonitorSessions(_ *session.Empty, stream session.SessionManager_MonitorSessionsServer) error {
	return c.s.mon.serve(stream)
}

func (c *compatService) IpChange(ctx context.Context, req *session.IpChangeList) (*session.Ack, error) {
	s := c.s
	p := peerOf(ctx)
	moves := make(map[netip.Addr]netip.Addr, len(req.GetIpChanges()))
	for _, ch := range req.GetIpChanges() {
		from, err := compatAddr("old_ip", ch.GetOldIp())
		if err == nil {
			var to netip.Addr
			if to, err = compatAddr("new_ip", ch.GetNewIp()); err == nil {
				if prev, dup := moves[from]; dup && prev != to {
					err = invalidf("old_ip %s is moved to both %s and %s", from, prev, to)
				}
				moves[from] = to
			}
		}
		if err != nil {
			var buf [64]byte
			s.log.Warn().Str("audit", opMove).Str("api", apiCompat).Str("peer", p.identity()).Bytes("peer_address", p.appendAddr(buf[:0])).
				Str("result", resultInvalid).Err(err).Msg(opMove)
			return nil, err
		}
	}
	if len(moves) == 0 {
		return &session.Ack{Success: true}, nil
	}
	var res state.MoveResult
	var rev int64
	s.bulk.Lock()
	var err error
	if s.sl != nil {
		res, rev, err = s.sl.move(moves)
	} else {
		err = s.maps.Do(func(m *state.Maps) error {
			var err error
			res, err = m.MoveDestinations(moves)
			return err
		})
	}
	s.bulk.Unlock()
	s.sl.ack(rev, opMove)
	s.mon.wrote()
	changes := make([]string, 0, len(moves))
	for from, to := range moves {
		changes = append(changes, from.String()+"->"+to.String())
	}
	slices.Sort(changes)
	ev, result := s.log.Info(), "moved"
	if err != nil {
		err = statusOf(err)
		ev, result = s.log.Warn().Err(err), resultOf(err)
	}
	var buf [64]byte
	ev.Str("audit", opMove).Str("api", apiCompat).Strs("changes", changes).
		Int("moved", res.Moved).Int("superseded", res.Superseded).
		Str("peer", p.identity()).Bytes("peer_address", p.appendAddr(buf[:0])).Str("result", result).Msg(opMove)
	if err != nil {
		return nil, err
	}
	return &session.Ack{Success: true}, nil
}
