package bpf_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
	tu "github.com/aegis-agent/aegis/internal/testutil"
)

// TestProgramsReadTheConfigMap checks bpf.DirectConfig: both programs of
// a prepared spec use the config map itself and no map of their own for
// config_data, and what user space writes there is what they act on. The
// same object loaded without it runs on a zeroed config nothing can
// reach, which is what the check tells apart.
func TestProgramsReadTheConfigMap(t *testing.T) {
	tu.RequireKernel(t)
	frame := tu.Frame{Src: netip.MustParseAddr("192.0.2.10"), Dst: netip.MustParseAddr("198.51.100.10"),
		Proto: tu.ProtoTCP, SrcPort: 40000, DstPort: 8080}.Bytes()
	// Monitor mode turns the frame's drop (no session) into a pass.
	monitorCfg := state.Config{Monitor: true, DefaultIdleTimeout: time.Minute}
	monitor, err := monitorCfg.Value()
	if err != nil {
		t.Fatal(err)
	}

	load := func(t *testing.T, spec *ebpf.CollectionSpec) *bpf.AegisObjects {
		var objs bpf.AegisObjects
		if err := spec.LoadAndAssign(&objs, nil); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { objs.Close() })
		if err := objs.Config.Put(uint32(0), &monitor); err != nil {
			t.Fatal(err)
		}
		return &objs
	}
	run := func(t *testing.T, p *ebpf.Program) bpf.Action {
		ret, _, err := p.Test(frame)
		if err != nil {
			t.Fatal(err)
		}
		return bpf.Action(ret)
	}

	spec, err := bpf.Spec()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := spec.Maps[bpf.ConfigSection]; ok {
		t.Fatalf("prepared spec still has %s", bpf.ConfigSection)
	}
	objs := load(t, spec)
	// Whether p uses config's map, and whether it uses a map of its own
	// named for the section.
	uses := func(t *testing.T, p *ebpf.Program, config *ebpf.Map) (shared, own bool) {
		cfgInfo, err := config.Info()
		if err != nil {
			t.Fatal(err)
		}
		cfgID, _ := cfgInfo.ID()
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := info.MapIDs()
		for _, id := range ids {
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				t.Fatal(err)
			}
			mi, _ := m.Info()
			m.Close()
			own = own || mi.Name == bpf.ConfigSection
			shared = shared || id == cfgID
		}
		return shared, own
	}
	for name, p := range map[string]*ebpf.Program{"aegis_xdp": objs.AegisXdp, "aegis_egress": objs.AegisEgress} {
		if shared, own := uses(t, p, objs.Config); !shared || own {
			t.Errorf("%s: uses the config map %v, a %s map of its own %v", name, shared, bpf.ConfigSection, own)
		}
	}
	if a := run(t, objs.AegisXdp); a != bpf.XDPPass {
		t.Fatalf("monitor mode written to the config map: %v, want pass", a)
	}

	// Unprepared, the program reads a zeroed copy: no monitor mode.
	raw, err := bpf.LoadAegis()
	if err != nil {
		t.Fatal(err)
	}
	rawObjs := load(t, raw)
	if a := run(t, rawObjs.AegisXdp); a != bpf.XDPDrop {
		t.Fatalf("without DirectConfig: %v; the check cannot tell the two apart", a)
	}
	if shared, own := uses(t, rawObjs.AegisXdp, rawObjs.Config); shared || !own {
		t.Fatalf("without DirectConfig: uses the config map %v, its own %v; the map check cannot tell the two apart", shared, own)
	}

	// Twice is once.
	if err := bpf.DirectConfig(spec); err != nil {
		t.Fatal(err)
	}
	if a := run(t, load(t, spec).AegisXdp); a != bpf.XDPPass {
		t.Fatalf("after a second DirectConfig: %v, want pass", a)
	}
}
