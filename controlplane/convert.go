package controlplane

import (
	"encoding/binary"
	"errors"
	"math"
	"net/netip"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/aegis-agent/aegis/internal/state"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
)

// This file turns requests into the state package's types, checking every
// field, and state errors into gRPC status codes.

var errShuttingDown = status.Error(codes.Unavailable, "aegis-controlplane is shutting down")

// MinIdleTimeout is the shortest idle timeout a grant may ask for: the data
// path refreshes last_seen at a coarser granularity than nanoseconds, so
// a shorter timeout would expire sessions between packets.
const MinIdleTimeout = time.Second

// statusOf maps an error of the state package to a gRPC status error.
func statusOf(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, state.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, state.ErrFull):
		return status.Error(codes.ResourceExhausted, err.Error()+": existing sessions are kept; raise aegis-loader --max-sessions or revoke sessions")
	case errors.Is(err, state.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, state.ErrNotLoaded), errors.Is(err, state.ErrPermission):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, state.ErrIncompatible):
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// Results of grants and revokes, as metrics labels and in the audit log.
const (
	resultCreated   = "created"
	resultRefreshed = "refreshed"
	// resultTakenOver: a grant replaced another user's live session
	// (--allow-session-takeover); resultConflict: it was refused for
	// that (claim).
	resultTakenOver   = "taken_over"
	resultConflict    = "conflict"
	resultRevoked     = "revoked"
	resultNotFound    = "not_found"
	resultInvalid     = "invalid"
	resultFull        = "full"
	resultUnavailable = "unavailable"
	resultError       = "error"
)

func resultOf(err error) string {
	switch status.Code(statusOf(err)) {
	case codes.InvalidArgument:
		return resultInvalid
	case codes.ResourceExhausted:
		return resultFull
	case codes.AlreadyExists:
		return resultConflict
	case codes.NotFound:
		return resultNotFound
	case codes.Unavailable, codes.FailedPrecondition:
		return resultUnavailable
	}
	return resultError
}

// grantResult is the result of a grant that went through: created for a
// session new to its user (none at the key, or another user's expired
// one), taken_over for another user's live one, refreshed for the user's
// own.
func grantResult(created bool, previous string, takeover bool) string {
	switch {
	case takeover:
		return resultTakenOver
	case created || previous != "":
		return resultCreated
	}
	return resultRefreshed
}

func invalidf(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

func parseAddr(field, s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, invalidf("%s is empty: want an IPv4 or IPv6 address", field)
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, invalidf("%s %q is not an IPv4 or IPv6 address", field, cut(s))
	}
	return a, nil
}

func parsePort(field string, p uint32) (uint16, error) {
	if p == 0 || p > math.MaxUint16 {
		return 0, invalidf("%s %d: want 1 to 65535", field, p)
	}
	return uint16(p), nil
}

func parseProtocol(p agentv1.Protocol) (state.Protocol, error) {
	switch p {
	case agentv1.Protocol_PROTOCOL_UNSPECIFIED, agentv1.Protocol_PROTOCOL_TCP:
		return state.TCP, nil
	case agentv1.Protocol_PROTOCOL_UDP:
		return state.UDP, nil
	case agentv1.Protocol_PROTOCOL_ANY:
		return state.Any, nil
	}
	return 0, invalidf("protocol %d: want PROTOCOL_TCP, PROTOCOL_UDP or PROTOCOL_ANY", int32(p))
}

func protocolOf(p state.Protocol) agentv1.Protocol {
	switch p {
	case state.TCP:
		return agentv1.Protocol_PROTOCOL_TCP
	case state.UDP:
		return agentv1.Protocol_PROTOCOL_UDP
	case state.Any:
		return agentv1.Protocol_PROTOCOL_ANY
	}
	return agentv1.Protocol_PROTOCOL_UNSPECIFIED
}

// parseDuration returns 0 for an unset duration.
func parseDuration(field string, d *durationpb.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, invalidf("%s: %v", field, err)
	}
	v := d.AsDuration()
	if v < 0 {
		return 0, invalidf("%s %v is negative", field, v)
	}
	return v, nil
}

// parseKey checks a session key given as strings.
func parseKey(src, dst string, port uint32, proto agentv1.Protocol) (state.Key, error) {
	var k state.Key
	var err error
	if k.Src, err = parseAddr("src_ip", src); err != nil {
		return k, err
	}
	if k.Dst, err = parseAddr("dst_ip", dst); err != nil {
		return k, err
	}
	if k.Port, err = parsePort("dst_port", port); err != nil {
		return k, err
	}
	if k.Proto, err = parseProtocol(proto); err != nil {
		return k, err
	}
	if err := k.Validate(); err != nil {
		return k, statusOf(err)
	}
	return k, nil
}

// loginSession checks a LoginEventRequest and returns the session to
// grant at now.
func loginSession(req *agentv1.LoginEventRequest, now uint64) (state.Session, error) {
	if err := state.ValidateUser(req.GetUser()); err != nil {
		return state.Session{}, statusOf(err)
	}
	k, err := parseKey(req.GetSrcIp(), req.GetDstIp(), req.GetDstPort(), req.GetProtocol())
	if err != nil {
		return state.Session{}, err
	}
	idle, err := parseDuration("idle_timeout", req.GetIdleTimeout())
	if err != nil {
		return state.Session{}, err
	}
	if idle != 0 && idle < MinIdleTimeout {
		return state.Session{}, invalidf("idle_timeout %v: want 0 (the default) or at least %v", idle, MinIdleTimeout)
	}
	lifetime, err := parseDuration("max_lifetime", req.GetMaxLifetime())
	if err != nil {
		return state.Session{}, err
	}
	s := state.Session{Key: k, User: req.GetUser(), LastSeen: now, Created: now, IdleTimeout: idle}
	if lifetime > 0 {
		s.Expires = now + uint64(lifetime)
	}
	return s, nil
}

// compatAddr decodes an IPv4 address of the compat API: the big-endian
// value of the address.
func compatAddr(field string, v uint32) (netip.Addr, error) {
	if v == 0 {
		return netip.Addr{}, invalidf("%s is 0.0.0.0", field)
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b), nil
}

// compatValue encodes an IPv4 address for the compat API.
func compatValue(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

// sessionProto describes a session read from the maps. Its user is
// escaped (state.Escape) if it is not printable: only this process's
// grants are checked, and a name some other tool wrote, perhaps invalid
// UTF-8 that proto3 cannot even encode, must neither reach a client raw
// nor fail the listing of every other session.
func sessionProto(s *state.Session, defaultIdle time.Duration, now uint64) *agentv1.Session {
	idle := s.IdleTimeout
	if idle == 0 {
		idle = defaultIdle
	}
	out := &agentv1.Session{
		User:         state.Escape(s.User),
		SrcIp:        s.Src.String(),
		DstIp:        s.Dst.String(),
		DstPort:      uint32(s.Port),
		Protocol:     protocolOf(s.Proto),
		CreateTime:   timestamppb.New(state.WallTime(s.Created)),
		LastSeenTime: timestamppb.New(state.WallTime(s.LastSeen)),
		IdleTimeout:  durationpb.New(idle),
		TimeLeft:     durationpb.New(s.TimeLeft(defaultIdle, now)),
		Expired:      !s.Verdict(defaultIdle, now).Pass(),
	}
	if s.Expires != 0 {
		out.ExpireTime = timestamppb.New(state.WallTime(s.Expires))
	}
	return out
}
