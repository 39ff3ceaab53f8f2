package loader

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// errBTFUnreadable means the process may not read the map's BTF.
var errBTFUnreadable = errors.New("map BTF unreadable without CAP_SYS_ADMIN")

// checkBTFLayout compares the struct layouts of a pinned map's key and value
// (from the map's BTF) with this build's. Sizes alone cannot tell a
// reordered or retyped field; the BTF can.
func checkBTFLayout(ms *ebpf.MapSpec, m *ebpf.Map) error {
	var structs []*btf.Struct
	for _, t := range []btf.Type{ms.Key, ms.Value} {
		if s, ok := btf.UnderlyingType(t).(*btf.Struct); ok {
			structs = append(structs, s)
		}
	}
	if len(structs) == 0 {
		return nil
	}
	h, err := m.Handle()
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return errBTFUnreadable
	}
	if err != nil {
		return fmt.Errorf("map carries no BTF to check its layout: %v", err)
	}
	defer h.Close()
	spec, err := h.Spec(nil)
	if err != nil {
		return fmt.Errorf("read map BTF: %v", err)
	}
	for _, want := range structs {
		var got *btf.Struct
		if err := spec.TypeByName(want.Name, &got); err != nil {
			return fmt.Errorf("struct %s missing from the map's BTF", want.Name)
		}
		if g, w := layoutOf(got), layoutOf(want); g != w && g != describeAs(want, formerPadding) {
			return fmt.Errorf("layout of struct %s changed from %s to %s", want.Name, g, w)
		}
	}
	return nil
}

// formerPadding names the struct members (struct.member) that took over a
// byte older builds of the same layout version declared as padding, with
// the padding's name: older builds wrote it zero and never read it, so a
// pinned map whose BTF still says padding holds this build's layout.
var formerPadding = map[string]string{
	"allow_port.rule": "pad",
}

// layoutOf describes a type's memory layout: names, offsets, sizes and
// element types, not qualifiers or typedef names.
func layoutOf(t btf.Type) string { return describeAs(t, nil) }

// describeAs is layoutOf calling the members that renames names (as
// struct.member) by the names it gives them.
func describeAs(t btf.Type, renames map[string]string) string {
	var b strings.Builder
	describe(&b, t, 0, renames)
	return b.String()
}

func describe(b *strings.Builder, t btf.Type, depth int, renames map[string]string) {
	if depth > 8 {
		b.WriteString("…")
		return
	}
	switch v := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		fmt.Fprintf(b, "{%d:", v.Size)
		for i, m := range v.Members {
			if i > 0 {
				b.WriteByte(' ')
			}
			name := m.Name
			if n, ok := renames[v.Name+"."+m.Name]; ok {
				name = n
			}
			fmt.Fprintf(b, "%s@%d:", name, m.Offset.Bytes())
			describe(b, m.Type, depth+1, renames)
		}
		b.WriteByte('}')
	case *btf.Int:
		fmt.Fprintf(b, "int%d", v.Size*8)
	case *btf.Enum:
		fmt.Fprintf(b, "enum%d", v.Size*8)
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", v.Nelems)
		describe(b, v.Type, depth+1, renames)
	default:
		fmt.Fprintf(b, "%T", v)
	}
}
