package proto_test

import (
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	agentv1 "github.com/aegis-agent/aegis/proto/aegis/agent/v1"
	"github.com/aegis-agent/aegis/proto/session"
)

// field is one expected field: name, number, kind, repeated.
type field struct {
	name     string
	number   protoreflect.FieldNumber
	kind     protoreflect.Kind
	repeated bool
}

func checkMessage(t *testing.T, md protoreflect.MessageDescriptor, want []field) {
	t.Helper()
	if md.Fields().Len() != len(want) {
		t.Errorf("%s has %d fields, want %d", md.FullName(), md.Fields().Len(), len(want))
	}
	for _, w := range want {
		f := md.Fields().ByName(protoreflect.Name(w.name))
		if f == nil {
			t.Errorf("%s: no field %s", md.FullName(), w.name)
			continue
		}
		if f.Number() != w.number || f.Kind() != w.kind || (f.Cardinality() == protoreflect.Repeated) != w.repeated {
			t.Errorf("%s.%s: number %d kind %v repeated %v; want %d %v %v", md.FullName(), w.name,
				f.Number(), f.Kind(), f.Cardinality() == protoreflect.Repeated, w.number, w.kind, w.repeated)
		}
	}
}

type method struct {
	name, in, out           string
	clientStream, srvStream bool
}

func checkService(t *testing.T, name protoreflect.FullName, want []method) {
	t.Helper()
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(name)
	if err != nil {
		t.Fatal(err)
	}
	sd := d.(protoreflect.ServiceDescriptor)
	if sd.Methods().Len() != len(want) {
		t.Errorf("%s has %d methods, want %d", name, sd.Methods().Len(), len(want))
	}
	for _, w := range want {
		m := sd.Methods().ByName(protoreflect.Name(w.name))
		if m == nil {
			t.Errorf("%s: no method %s", name, w.name)
			continue
		}
		if string(m.Input().FullName()) != w.in || string(m.Output().FullName()) != w.out ||
			m.IsStreamingClient() != w.clientStream || m.IsStreamingServer() != w.srvStream {
			t.Errorf("%s.%s: %s -> %s (streams %v/%v)", name, w.name, m.Input().FullName(), m.Output().FullName(),
				m.IsStreamingClient(), m.IsStreamingServer())
		}
	}
}

// The compat service is the wire contract with deployed Aegis
// controllers: names, numbers and types must never change.
func TestSessionManagerWire(t *testing.T) {
	u32, b, i32, msg := protoreflect.Uint32Kind, protoreflect.BoolKind, protoreflect.Int32Kind, protoreflect.MessageKind
	checkMessage(t, (&session.LoginEvent{}).ProtoReflect().Descriptor(), []field{
		{"src_ip", 1, u32, false}, {"dst_ip", 2, u32, false}, {"dst_port", 3, u32, false}, {"activate", 4, b, false}})
	checkMessage(t, (&session.Ack{}).ProtoReflect().Descriptor(), []field{{"success", 1, b, false}})
	checkMessage(t, (&session.Empty{}).ProtoReflect().Descriptor(), nil)
	checkMessage(t, (&session.SessionList{}).ProtoReflect().Descriptor(), []field{{"sessions", 1, msg, true}})
	checkMessage(t, (&session.Session{}).ProtoReflect().Descriptor(), []field{
		{"src_ip", 1, u32, false}, {"dst_ip", 2, u32, false}, {"dst_port", 3, u32, false}, {"time_left", 4, i32, false}})
	checkMessage(t, (&session.IpChangeList{}).ProtoReflect().Descriptor(), []field{{"ip_changes", 1, msg, true}})
	checkMessage(t, (&session.IpChangeEvent{}).ProtoReflect().Descriptor(), []field{{"old_ip", 1, u32, false}, {"new_ip", 2, u32, false}})
	checkService(t, "session.SessionManager", []method{
		{"SubmitSession", "session.LoginEvent", "session.Ack", false, false},
		{"MonitorSessions", "session.Empty", "session.SessionList", false, true},
		{"IpChange", "session.IpChangeList", "session.Ack", false, false},
	})
}

func TestAgentServiceWire(t *testing.T) {
	checkMessage(t, (&agentv1.LoginEventRequest{}).ProtoReflect().Descriptor(), []field{
		{"user", 1, protoreflect.StringKind, false}, {"src_ip", 2, protoreflect.StringKind, false},
		{"dst_ip", 3, protoreflect.StringKind, false}, {"dst_port", 4, protoreflect.Uint32Kind, false},
		{"protocol", 5, protoreflect.EnumKind, false}, {"idle_timeout", 6, protoreflect.MessageKind, false},
		{"max_lifetime", 7, protoreflect.MessageKind, false}})
	md := (&agentv1.LoginEventRequest{}).ProtoReflect().Descriptor()
	for name, want := range map[string]protoreflect.FullName{"idle_timeout": "google.protobuf.Duration", "max_lifetime": "google.protobuf.Duration"} {
		if got := md.Fields().ByName(protoreflect.Name(name)).Message().FullName(); got != want {
			t.Errorf("%s is a %s, want %s", name, got, want)
		}
	}
	ed := agentv1.Protocol(0).Descriptor()
	for n, name := range []protoreflect.Name{"PROTOCOL_UNSPECIFIED", "PROTOCOL_TCP", "PROTOCOL_UDP", "PROTOCOL_ANY"} {
		if v := ed.Values().ByName(name); v == nil || v.Number() != protoreflect.EnumNumber(n) {
			t.Errorf("enum value %s: %v", name, v)
		}
	}
	p := "aegis.agent.v1."
	checkService(t, "aegis.agent.v1.AgentService", []method{
		{"LoginEvent", p + "LoginEventRequest", p + "LoginEventResponse", false, false},
		{"StreamLoginEvents", p + "LoginEventRequest", p + "StreamLoginEventsResponse", true, false},
		{"LogoutEvent", p + "LogoutEventRequest", p + "LogoutEventResponse", false, false},
		{"ListSessions", p + "ListSessionsRequest", p + "ListSessionsResponse", false, false},
		{"GetStats", p + "GetStatsRequest", p + "GetStatsResponse", false, false},
	})
}
