package bpf_test

import (
	"bufio"
	"github.com/cilium/ebpf"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/bpf"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// kallsyms returns the addresses of the named kernel symbols.
func kallsyms(t *testing.T, names ...string) map[string]uint64 {
	t.Helper()
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := make(map[string]bool)
	for _, n := range names {
		want[n] = true
	}
	addrs := make(map[string]uint64)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || !want[fields[2]] {
			continue
		}
		a, err := strconv.ParseUint(fields[0], 16, 64)
		if err == nil && a != 0 {
			addrs[fields[2]] = a
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if addrs[n] == 0 {
			if os.Getenv(tu.RequireKernelEnv) == "1" {
				t.Fatalf("no address for kernel symbol %s (kernel.kptr_restrict?)", n)
			}
			t.Skipf("no address for kernel symbol %s (kernel.kptr_restrict?)", n)
		}
	}
	return addrs
}

// TestMapLookupsAreInlined checks that the verifier inlined every map
// lookup of aegis_xdp and aegis_egress. A call to the generic
// bpf_map_lookup_elem helper means the compiler merged the lookups of two
// maps into one call site (see LOOKUP_APART in aegis.c): the map is then
// chosen at run time, and every lookup there pays the helper's indirect
// call.
func TestMapLookupsAreInlined(t *testing.T) {
	tu.RequireKernel(t)
	sym := kallsyms(t, "__bpf_call_base", "bpf_map_lookup_elem", "__htab_map_lookup_elem")
	offset := func(name string) int64 { return int64(int32(sym[name] - sym["__bpf_call_base"])) }

	var objs bpf.AegisObjects
	if err := bpf.LoadObjects(&objs, nil); err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	for _, p := range []struct {
		name string
		prog *ebpf.Program
		// The hash and LRU lookups the program makes at least: both
		// families' sessions and flows, on the fast path and the
		// general one; egress, sessions, flows and tombstones.
		min int
	}{{"aegis_xdp", objs.AegisXdp, 8}, {"aegis_egress", objs.AegisEgress, 6}} {
		info, err := p.prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		insns, err := info.Instructions()
		if err != nil {
			t.Fatalf("read the verifier's instructions of %s: %v", p.name, err)
		}
		var generic, inlined int
		for i, ins := range insns {
			if !ins.IsBuiltinCall() {
				continue
			}
			switch ins.Constant {
			case offset("bpf_map_lookup_elem"):
				generic++
				t.Errorf("%s: instruction %d calls the generic bpf_map_lookup_elem", p.name, i)
			case offset("__htab_map_lookup_elem"):
				inlined++
			}
		}
		if inlined < p.min {
			t.Fatalf("%s: %d inlined hash lookups, want at least %d: is this reading the right calls?", p.name, inlined, p.min)
		}
		t.Logf("%s: %d inlined hash lookups, %d generic lookups", p.name, inlined, generic)
	}
}
