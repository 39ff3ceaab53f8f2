package controlplane

import (
	"context"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// This file makes a request that does not decode (truncated or garbled
// protobuf, invalid UTF-8 in a string field) an InvalidArgument with an
// audit line, like every other refused request.
//
// grpc-go cannot be told to do so. Its server decodes a request in
// serverStream.RecvMsg, for unary RPCs too (the generated handler's dec
// is RecvMsg), and a codec error there becomes codes.Internal, "grpc:
// failed to unmarshal the received message", which RecvMsg writes to the
// client at once, in a deferred WriteStatus, before any interceptor of a
// unary call has run. Mapping the error afterwards changes nothing the
// client sees.
//
// So the server's codec (grpc.ForceServerCodecV2) never fails a request:
// when the proto codec does, it resets the message and notes the error
// against the message's pointer. The decoded message is then handed, for
// a unary call, to the interceptor chain, whose first link after the
// metrics (guardUnary) takes the note and refuses the call; for a stream,
// to the handler's RecvMsg, which guardStream wraps to do the same. Each
// note is taken right after it is made, on the same goroutine, so the
// table never holds more than the calls being decoded; messages that
// decode cost one atomic load. Should a check ever be skipped, the
// handler sees an empty message, which every handler refuses or reads as
// asking for nothing in particular (no filter, no change).
//
// A gRPC frame cut short by the transport (the client resetting or
// half-closing mid-message) is not a codec error and still ends as
// grpc-go reports it.

// requestCodec is the proto codec, with decode failures noted instead of
// returned.
type requestCodec struct {
	encoding.CodecV2
	failed  sync.Map // request message pointer -> error
	pending atomic.Int64
}

func newRequestCodec() *requestCodec {
	return &requestCodec{CodecV2: newServerCodec()}
}

func (c *requestCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok {
		return err // not a request of ours: a bug, let grpc-go say Internal
	}
	proto.Reset(m)
	c.pending.Add(1)
	c.failed.Store(v, err)
	return nil
}

// take returns the decode error noted for request v, if any, and forgets
// it.
func (c *requestCodec) take(v any) error {
	if c.pending.Load() == 0 {
		return nil
	}
	err, ok := c.failed.LoadAndDelete(v)
	if !ok {
		return nil
	}
	c.pending.Add(-1)
	return err.(error)
}

// malformedError is the refusal of a request that did not decode. A
// handler that reads a stream of requests tells it from the stream's own
// errors: the stream is intact and its next message can be read.
type malformedError struct{ st *status.Status }

func (e *malformedError) Error() string              { return e.st.Err().Error() }
func (e *malformedError) GRPCStatus() *status.Status { return e.st }

// methodOps names, for the audit line of a request that did not decode,
// the operation and API of each session method. SubmitSession, which
// grants or revokes as its undecoded request says, and the reads are
// opCall; other services' methods (health, reflection) are opCall of no
// API.
var methodOps = map[string][2]string{
	agentv1.AgentService_LoginEvent_FullMethodName:        {opGrant, apiAgent},
	agentv1.AgentService_StreamLoginEvents_FullMethodName: {opGrant, apiAgent},
	agentv1.AgentService_LogoutEvent_FullMethodName:       {opRevoke, apiAgent},
	agentv1.AgentService_ListSessions_FullMethodName:      {opCall, apiAgent},
	agentv1.AgentService_GetStats_FullMethodName:          {opCall, apiAgent},
	agentv1.AgentService_WatchVerdicts_FullMethodName:     {opCall, apiAgent},
	agentv1.AgentService_Explain_FullMethodName:           {opCall, apiAgent},
	session.SessionManager_SubmitSession_FullMethodName:   {opCall, apiCompat},
	session.SessionManager_MonitorSessions_FullMethodName: {opCall, apiCompat},
	session.SessionManager_IpChange_FullMethodName:        {opMove, apiCompat},
}

// malformed audits a request of method that did not decode and returns
// its refusal.
func (s *Server) malformed(ctx context.Context, method string, decodeErr error) error {
	err := &malformedError{status.Newf(codes.InvalidArgument, "malformed request: %v", decodeErr)}
	op, api := opCall, ""
	if o, ok := methodOps[method]; ok {
		op, api = o[0], o[1]
	}
	if ev := s.auditEvent(op, api, "", resultInvalid, err); ev != nil {
		p := peerOf(ctx)
		s.auditDone(ev.Str("method", method), &p, op, resultInvalid)
	}
	return err
}

// guardUnary refuses a unary call whose request did not decode. It must
// run for every unary call, so it comes before anything that may refuse
// one (the authorizer): otherwise a note would stay behind. The caller
// is authorized first all the same, so that a client outside the
// allowlist hears PermissionDenied whatever it sends.
func (s *Server) guardUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if decodeErr := s.codec.take(req); decodeErr != nil {
		if err := s.auth.check(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return nil, s.malformed(ctx, info.FullMethod, decodeErr)
	}
	return handler(ctx, req)
}

// guardStream makes the stream's RecvMsg refuse a request that did not
// decode.
func (s *Server) guardStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, &guardedStream{ServerStream: ss, s: s, method: info.FullMethod})
}

type guardedStream struct {
	grpc.ServerStream
	s      *Server
	method string
}

func (g *guardedStream) RecvMsg(m any) error {
	if err := g.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if decodeErr := g.s.codec.take(m); decodeErr != nil {
		return g.s.malformed(g.Context(), g.method, decodeErr)
	}
	return nil
}
