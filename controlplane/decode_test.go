package controlplane_test

import (
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/controlplane"
	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// raw is a request sent as these bytes, whatever they are.
type raw []byte

// rawCodec sends raw as it is and everything else as protobuf, as a
// client with a broken or hostile encoder would.
type rawCodec struct{ encoding.CodecV2 }

func (c rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(raw); ok {
		return mem.BufferSlice{mem.SliceBuffer(r)}, nil
	}
	return c.CodecV2.Marshal(v)
}

func forceRaw() grpc.CallOption {
	return grpc.ForceCodecV2(rawCodec{encoding.GetCodecV2(protocodec.Name)})
}

// Requests that do not decode: a string field (user = 1, or src_ip = 2) of
// invalid UTF-8, a length running past the end, a varint that never ends.
var (
	badUTF8User   = raw("\x0a\x04bo\xffb\x12\x0a192.0.2.10")
	truncatedUser = raw("\x0a\x10alice")
	endlessVarint = raw("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
)

// A request that does not decode gets InvalidArgument, not grpc-go's
// Internal, with one audit line naming the peer and the result, on every
// kind of RPC, and changes nothing.
func TestUndecodableRequestsAreInvalidAndAudited(t *testing.T) {
	e := newEnv(t, envOptions{})
	conn := e.dial(e.client("controller"))
	agent := agentv1.NewAgentServiceClient(conn)
	c := ctx(t)
	if _, err := agent.LoginEvent(c, login("alice", client4, svcA4, 22, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := session.NewSessionManagerClient(conn).SubmitSession(c,
		&session.LoginEvent{SrcIp: ip4(other4), DstIp: ip4(svcA4), DstPort: 80, Activate: true}); err != nil {
		t.Fatal(err)
	}
	before := e.dump()

	type call struct {
		method string
		body   raw
		reply  any
		audit  map[string]any // fields the audit line must have
	}
	calls := map[string]call{
		"LoginEvent, invalid UTF-8": {agentv1.AgentService_LoginEvent_FullMethodName, badUTF8User, &agentv1.LoginEventResponse{},
			map[string]any{"audit": "grant", "api": "agent"}},
		"LoginEvent, truncated": {agentv1.AgentService_LoginEvent_FullMethodName, truncatedUser, &agentv1.LoginEventResponse{},
			map[string]any{"audit": "grant", "api": "agent"}},
		"LogoutEvent, invalid UTF-8": {agentv1.AgentService_LogoutEvent_FullMethodName, badUTF8User, &agentv1.LogoutEventResponse{},
			map[string]any{"audit": "revoke", "api": "agent"}},
		"ListSessions, invalid UTF-8": {agentv1.AgentService_ListSessions_FullMethodName, badUTF8User, &agentv1.ListSessionsResponse{},
			map[string]any{"audit": "call", "api": "agent"}},
		"SubmitSession, garbled": {session.SessionManager_SubmitSession_FullMethodName, endlessVarint, &session.Ack{},
			map[string]any{"audit": "call", "api": "compat"}},
		"SubmitSession, truncated": {session.SessionManager_SubmitSession_FullMethodName, raw("\x08"), &session.Ack{},
			map[string]any{"audit": "call", "api": "compat"}},
		"IpChange, truncated": {session.SessionManager_IpChange_FullMethodName, raw("\x0a\x05\x08\x01"), &session.Ack{},
			map[string]any{"audit": "move", "api": "compat"}},
	}
	for name, cl := range calls {
		err := conn.Invoke(c, cl.method, cl.body, cl.reply, forceRaw())
		if code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "malformed request") {
			t.Errorf("%s: %v, want InvalidArgument: malformed request", name, err)
		}
	}
	e.sameSessions("after the undecodable requests", before)

	// One audit line per call, with the method, peer and result.
	lines := map[string]int{}
	for _, op := range []string{"grant", "revoke", "move", "call"} {
		for _, l := range e.logs.JSONLines(t, op) {
			if l["result"] != "invalid" || l["method"] == nil {
				continue
			}
			if l["peer"] != "controller" || !strings.HasPrefix(l["peer_address"].(string), "127.0.0.1:") || l["level"] != "warn" ||
				!strings.Contains(l["error"].(string), "InvalidArgument") {
				t.Errorf("audit line %v", l)
			}
			lines[l["method"].(string)]++
			for name, cl := range calls {
				if cl.method != l["method"] {
					continue
				}
				for f, v := range cl.audit {
					if l[f] != v {
						t.Errorf("%s: audit field %s = %v, want %v: %v", name, f, l[f], v, l)
					}
				}
			}
		}
	}
	want := map[string]int{}
	for _, cl := range calls {
		want[cl.method]++
	}
	for m, n := range want {
		if lines[m] != n {
			t.Errorf("%s: %d audit lines, want %d", m, lines[m], n)
		}
	}
	if n := controlplane.PendingDecodeErrors(e.srv); n != 0 {
		t.Fatalf("%d decode failures left noted", n)
	}
	// The refused grants are counted as such.
	if v := value(t, gather(t, e), "aegis_controlplane_grants_total", "api=agent", "result=invalid"); v != 2 {
		t.Errorf("grants_total{agent,invalid} = %v, want 2", v)
	}
}

// In StreamLoginEvents a message that does not decode is one rejection,
// audited; the messages around it are applied.
func TestUndecodableStreamedLogin(t *testing.T) {
	e := newEnv(t, envOptions{})
	conn := e.dial(e.client("controller"))
	c := ctx(t)
	stream, err := conn.NewStream(c, &agentv1.AgentService_ServiceDesc.Streams[0],
		agentv1.AgentService_StreamLoginEvents_FullMethodName, forceRaw())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []any{login("alice", client4, svcA4, 22, 0), badUTF8User, truncatedUser, login("bob", client4, svcA4, 23, 0)} {
		if err := stream.SendMsg(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var resp agentv1.StreamLoginEventsResponse
	if err := stream.RecvMsg(&resp); err != nil {
		t.Fatalf("stream with undecodable messages: %v", err)
	}
	if resp.GetApplied() != 2 || resp.GetRejected() != 2 || len(resp.GetRejections()) != 2 {
		t.Fatalf("response %v, want 2 applied, 2 rejected", &resp)
	}
	for i, r := range resp.GetRejections() {
		if r.GetIndex() != uint64(i+1) || codes.Code(r.GetCode()) != codes.InvalidArgument || !strings.Contains(r.GetMessage(), "malformed request") {
			t.Errorf("rejection %v, want index %d, InvalidArgument", r, i+1)
		}
	}
	if n := len(e.dump()); n != 2 {
		t.Fatalf("%d sessions, want alice's and bob's", n)
	}
	n := 0
	for _, l := range e.logs.JSONLines(t, "grant") {
		if l["method"] == agentv1.AgentService_StreamLoginEvents_FullMethodName && l["result"] == "invalid" && l["peer"] == "controller" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d audit lines of undecodable streamed logins, want 2:\n%s", n, e.logs.String())
	}
}

// A server-streaming call whose one request does not decode ends with
// InvalidArgument before it sends anything.
func TestUndecodableMonitorRequest(t *testing.T) {
	e := newEnv(t, envOptions{})
	conn := e.dial(e.client("controller"))
	stream, err := conn.NewStream(ctx(t), &session.SessionManager_ServiceDesc.Streams[0],
		session.SessionManager_MonitorSessions_FullMethodName, forceRaw())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.SendMsg(raw("\x08")); err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var list session.SessionList
	if err := stream.RecvMsg(&list); code(err) != codes.InvalidArgument {
		t.Fatalf("MonitorSessions with an undecodable request: %v, want InvalidArgument", err)
	}
	n := 0
	for _, l := range e.logs.JSONLines(t, "call") {
		if l["method"] == session.SessionManager_MonitorSessions_FullMethodName && l["api"] == "compat" && l["peer"] == "controller" {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d audit lines, want 1:\n%s", n, e.logs.String())
	}
}

// A client outside the allowlist hears PermissionDenied whatever it sends.
func TestUndecodableFromUnauthorizedClient(t *testing.T) {
	e := newEnv(t, envOptions{allowed: []string{"controller"}})
	conn := e.dial(e.client("intruder"))
	err := conn.Invoke(ctx(t), agentv1.AgentService_LoginEvent_FullMethodName, badUTF8User, &agentv1.LoginEventResponse{}, forceRaw())
	if code(err) != codes.PermissionDenied {
		t.Fatalf("undecodable request of an unauthorized client: %v, want PermissionDenied", err)
	}
	// The refusal took the codec's note: none is left behind.
	if n := controlplane.PendingDecodeErrors(e.srv); n != 0 {
		t.Fatalf("%d decode failures left noted", n)
	}
}
