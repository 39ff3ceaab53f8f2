package controlplane

import (
	"context"
	"errors"
	"io"
	"net/netip"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// requestTarget describes the session a request names, as it came.
func requestTarget(src, dst string, port uint32, proto agentv1.Protocol) *target {
	t := &target{src: src, dst: dst, port: port}
	switch proto {
	case agentv1.Protocol_PROTOCOL_UNSPECIFIED, agentv1.Protocol_PROTOCOL_TCP:
		t.proto = state.TCP.String()
	case agentv1.Protocol_PROTOCOL_UDP:
		t.proto = state.UDP.String()
	case agentv1.Protocol_PROTOCOL_ANY:
		t.proto = state.Any.String()
	default:
		t.proto = proto.String()
	}
	return t
}

// maxRejections is how many rejected requests of a StreamLoginEvents call
// are reported one by one; the rest are only counted.
const maxRejections = 100

// agentService implements aegis.agent.v1.AgentService.
type agentService struct {
	agentv1.UnimplementedAgentServiceServer
	s *Server
}

// grant applies one login. It is what LoginEvent and each message of
// StreamLoginEvents do. A session that passes to the user from another
// (claim) is reported as created: it is new to this user.
func (a *agentService) grant(p *peerInfo, req *agentv1.LoginEventRequest) (stored state.Session, created bool, err error) {
	s := a.s
	sess, err := loginSession(req, state.Now())
	if err != nil {
		s.auditTarget(opGrant, apiAgent, p, req.GetUser(), requestTarget(req.GetSrcIp(), req.GetDstIp(), req.GetDstPort(), req.GetProtocol()), resultInvalid, err)
		return sess, false, err
	}
	stored, created, previous, err := s.grantClaimed(p, apiAgent, sess)
	return stored, created || previous != "", err
}

func (a *agentService) LoginEvent(ctx context.Context, req *agentv1.LoginEventRequest) (*agentv1.LoginEventResponse, error) {
	p := peerOf(ctx)
	stored, created, err := a.grant(&p, req)
	if err != nil {
		return nil, err
	}
	resp := &agentv1.LoginEventResponse{Created: created}
	// The map's default idle timeout only matters for describing the
	// session; a failure to read it does not undo the grant.
	_ = a.s.maps.Do(func(m *state.Maps) error {
		cfg, err := m.ReadConfig()
		if err == nil {
			resp.Session = sessionProto(&stored, cfg.DefaultIdleTimeout, state.Now())
		}
		return err
	})
	return resp, nil
}

func (a *agentService) StreamLoginEvents(stream agentv1.AgentService_StreamLoginEventsServer) error {
	p := peerOf(stream.Context())
	resp := &agentv1.StreamLoginEventsResponse{}
	for index := uint64(0); ; index++ {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(resp)
		}
		var malformed *malformedError
		if err != nil && !errors.As(err, &malformed) {
			return err
		}
		if err == nil {
			// A message that did not decode (already audited) is
			// rejected like any other malformed request; the next can
			// still be read.
			_, _, err = a.grant(&p, req)
		}
		switch status.Code(err) {
		case codes.OK:
			resp.Applied++
			continue
		case codes.Unavailable, codes.FailedPrecondition, codes.Internal:
			// No later grant can succeed either; those applied stay.
			st, _ := status.FromError(err)
			return status.Errorf(st.Code(), "%s (after %d grants applied, %d rejected)", st.Message(), resp.Applied, resp.Rejected)
		}
		resp.Rejected++
		if len(resp.Rejections) < maxRejections {
			st, _ := status.FromError(err)
			resp.Rejections = append(resp.Rejections, &agentv1.Rejection{Index: index, Code: uint32(st.Code()), Message: st.Message()})
		}
	}
}

func (a *agentService) LogoutEvent(ctx context.Context, req *agentv1.LogoutEventRequest) (*agentv1.LogoutEventResponse, error) {
	p := peerOf(ctx)
	s := a.s
	user := req.GetUser()
	if user != "" {
		if err := state.ValidateUser(user); err != nil {
			err = statusOf(err)
			s.audit(opRevoke, apiAgent, &p, user, nil, resultInvalid, err)
			return nil, err
		}
	}
	noKey := req.GetSrcIp() == "" && req.GetDstIp() == "" && req.GetDstPort() == 0 && req.GetProtocol() == agentv1.Protocol_PROTOCOL_UNSPECIFIED
	if noKey {
		if user == "" {
			err := invalidf("give a user, a session key (src_ip, dst_ip, dst_port), or both")
			s.audit(opRevoke, apiAgent, &p, "", nil, resultInvalid, err)
			return nil, err
		}
		return a.revokeUser(&p, user)
	}
	k, err := parseKey(req.GetSrcIp(), req.GetDstIp(), req.GetDstPort(), req.GetProtocol())
	if err != nil {
		s.auditTarget(opRevoke, apiAgent, &p, user, requestTarget(req.GetSrcIp(), req.GetDstIp(), req.GetDstPort(), req.GetProtocol()), resultInvalid, err)
		return nil, err
	}
	var owner string
	if s.sl != nil {
		return a.revokeStored(&p, k, user)
	}
	if user == "" {
		s.bulk.RLock()
		err = s.maps.Do(func(m *state.Maps) error {
			old, err := m.Lookup(k)
			owner = old.User
			if err != nil {
				return err
			}
			return m.Revoke(k)
		})
		s.bulk.RUnlock()
	} else {
		// Checked and deleted under the exclusive lock, so that a grant
		// of the key to someone else in between is not revoked.
		s.bulk.Lock()
		err = s.maps.Do(func(m *state.Maps) error {
			old, err := m.Lookup(k)
			if err != nil {
				return err
			}
			if old.User != user {
				return status.Errorf(codes.NotFound, "%v: the session belongs to another user", state.ErrNotFound)
			}
			owner = old.User
			return m.Revoke(k)
		})
		s.bulk.Unlock()
	}
	if owner == "" {
		owner = user
	}
	if err != nil {
		err = statusOf(err)
		s.audit(opRevoke, apiAgent, &p, owner, &k, resultOf(err), err)
		return nil, err
	}
	s.audit(opRevoke, apiAgent, &p, owner, &k, resultRevoked, nil)
	return &agentv1.LogoutEventResponse{Revoked: 1}, nil
}

func (a *agentService) revokeUser(p *peerInfo, user string) (*agentv1.LogoutEventResponse, error) {
	s := a.s
	var keys []state.Key
	var rev int64
	s.bulk.Lock()
	var err error
	if s.sl != nil {
		all := s.sl.userKeys(user)
		var deleted []bool
		deleted, _, rev, err = s.sl.revoke(all, user)
		if errors.Is(err, state.ErrNotFound) {
			err = nil // none: Revoked 0, as without a store
		}
		for i, d := range deleted {
			if d {
				keys = append(keys, all[i])
			}
		}
	} else {
		err = s.maps.Do(func(m *state.Maps) error {
			var err error
			keys, err = m.RevokeUser(user)
			return err
		})
	}
	s.bulk.Unlock()
	s.sl.ack(rev, opRevoke)
	for i := range keys {
		s.audit(opRevoke, apiAgent, p, user, &keys[i], resultRevoked, nil)
	}
	if err != nil {
		err = statusOf(err)
		s.audit(opRevoke, apiAgent, p, user, nil, resultOf(err), err)
		return nil, err
	}
	if len(keys) == 0 {
		s.audit(opRevoke, apiAgent, p, user, nil, resultNotFound, nil)
	}
	return &agentv1.LogoutEventResponse{Revoked: uint32(len(keys))}, nil
}

// revokeStored is LogoutEvent of one key with a store.
func (a *agentService) revokeStored(p *peerInfo, k state.Key, user string) (*agentv1.LogoutEventResponse, error) {
	s := a.s
	var deleted []bool
	var owners []string
	var rev int64
	s.bulk.RLock()
	unlock := s.keys.lock(k)
	deleted, owners, rev, err := s.sl.revoke([]state.Key{k}, user)
	if errors.Is(err, state.ErrNotFound) {
		err = nil // told apart below
	}
	unlock()
	s.bulk.RUnlock()
	s.sl.ack(rev, opRevoke)
	owner := user
	if err == nil && !deleted[0] {
		if owners[0] != "" && user != "" && owners[0] != user {
			err = status.Errorf(codes.NotFound, "%v: the session belongs to another user", state.ErrNotFound)
		} else {
			err = state.ErrNotFound
		}
	}
	if owners[0] != "" && (user == "" || owners[0] == user) {
		owner = owners[0]
	}
	if err != nil {
		err = statusOf(err)
		s.audit(opRevoke, apiAgent, p, owner, &k, resultOf(err), err)
		return nil, err
	}
	s.audit(opRevoke, apiAgent, p, owner, &k, resultRevoked, nil)
	return &agentv1.LogoutEventResponse{Revoked: 1}, nil
}

func (a *agentService) ListSessions(ctx context.Context, req *agentv1.ListSessionsRequest) (*agentv1.ListSessionsResponse, error) {
	var src, dst netip.Addr
	var err error
	if req.GetUser() != "" {
		if err := state.ValidateUser(req.GetUser()); err != nil {
			return nil, statusOf(err)
		}
	}
	if req.GetSrcIp() != "" {
		if src, err = parseAddr("src_ip", req.GetSrcIp()); err != nil {
			return nil, err
		}
	}
	if req.GetDstIp() != "" {
		if dst, err = parseAddr("dst_ip", req.GetDstIp()); err != nil {
			return nil, err
		}
	}
	if req.GetDstPort() > 65535 {
		return nil, invalidf("dst_port %d: want 1 to 65535, or 0 for any", req.GetDstPort())
	}
	f := listFilter{user: req.GetUser(), src: src, dst: dst, port: uint16(req.GetDstPort())}
	var after *listKey
	if tok := req.GetPageToken(); tok != "" {
		k, err := parsePageToken(tok)
		if err != nil {
			return nil, err
		}
		after = &k
	}
	size := pageSize(req.GetPageSize(), req.GetLimit())
	var pg page
	var cfg state.Config
	err = a.s.maps.Do(func(m *state.Maps) error {
		var err error
		if cfg, err = m.ReadConfig(); err != nil {
			return err
		}
		pg, err = listPage(m, &f, after, size)
		return err
	})
	if err != nil {
		return nil, statusOf(err)
	}
	resp := &agentv1.ListSessionsResponse{Matched: pg.matched, NextPageToken: pg.next}
	now := state.Now()
	resp.Sessions = make([]*agentv1.Session, len(pg.sessions))
	for i := range pg.sessions {
		resp.Sessions[i] = sessionProto(&pg.sessions[i], cfg.DefaultIdleTimeout, now)
	}
	return resp, nil
}

func (a *agentService) GetStats(ctx context.Context, _ *agentv1.GetStatsRequest) (*agentv1.GetStatsResponse, error) {
	resp := &agentv1.GetStatsResponse{}
	err := a.s.maps.Do(func(m *state.Maps) error {
		cfg, err := m.ReadConfig()
		if err != nil {
			return err
		}
		counters, err := m.ReadStats()
		if err != nil {
			return err
		}
		v4, v6, err := m.Count()
		if err != nil {
			return err
		}
		resp.DefaultIdleTimeout = durationpb.New(cfg.DefaultIdleTimeout)
		resp.Monitor = cfg.Monitor
		resp.SessionsV4 = &agentv1.MapUsage{Entries: uint64(v4), Capacity: uint64(m.SessionsV4.MaxEntries())}
		resp.SessionsV6 = &agentv1.MapUsage{Entries: uint64(v6), Capacity: uint64(m.SessionsV6.MaxEntries())}
		for _, r := range state.Reasons {
			resp.Counters = append(resp.Counters, &agentv1.VerdictCounter{
				Verdict: r.Verdict(), Reason: r.String(), Packets: counters[r].Packets, Bytes: counters[r].Bytes,
			})
		}
		hits, err := state.ReadAllowHits(m)
		if err != nil {
			return err
		}
		for _, h := range hits.Rules {
			resp.AllowRules = append(resp.AllowRules, &agentv1.AllowRuleCounter{
				Rule: state.FormatAllowRule(h.Rule), Packets: h.Packets, Id: uint32(h.ID),
			})
		}
		resp.AllowUnnumberedPackets = hits.Unnumbered[0] + hits.Unnumbered[1]
		return nil
	})
	if err != nil {
		return nil, statusOf(err)
	}
	return resp, nil
}
