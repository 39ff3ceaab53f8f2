package loader_test

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
	"github.com/aegis-agent/aegis/loader"
)

// allowMapNaming returns this build's allow_v4 spec with the member of
// struct allow_port at index 1 renamed, as an older build's BTF would
// carry it.
func allowMapNaming(t *testing.T, member string) *ebpf.MapSpec {
	t.Helper()
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps[state.MapAllowV4].Copy()
	ms.Value = btf.Copy(ms.Value)
	var port *btf.Struct
	for _, m := range btf.UnderlyingType(ms.Value).(*btf.Struct).Members {
		if a, ok := btf.UnderlyingType(m.Type).(*btf.Array); ok {
			port = btf.UnderlyingType(a.Type).(*btf.Struct)
		}
	}
	if port == nil || port.Name != "allow_port" || port.Members[1].Name != "rule" {
		t.Fatalf("allow_value's ports are not allow_port {proto, rule, port}: %v", port)
	}
	port.Members[1].Name = member
	return ms
}

// A pinned allow map of an older build, whose BTF calls the rule id's
// byte padding, is this build's layout; any other renamed member is not.
func TestLayoutAcceptsFormerPadding(t *testing.T) {
	tu.RequireKernel(t)
	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	want := spec.Maps[state.MapAllowV4]
	for _, c := range []struct {
		member string
		ok     bool
	}{{"pad", true}, {"rule", true}, {"flags", false}} {
		m, err := ebpf.NewMap(allowMapNaming(t, c.member))
		if err != nil {
			t.Fatal(err)
		}
		err = loader.CheckPinnedMap(want, m, "allow_v4")
		m.Close()
		if c.ok != (err == nil) || (err != nil && !errors.Is(err, loader.ErrIncompatible)) {
			t.Errorf("member %q: %v", c.member, err)
		}
	}
}
