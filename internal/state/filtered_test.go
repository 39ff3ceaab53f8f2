package state_test

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/internal/state"
)

// TestJudge covers the definition of filtered for both kinds of evidence:
// the link's own info (root) and the loader's record (the daemons).
func TestJudge(t *testing.T) {
	rec := state.Interface{Name: "eth0", Ifindex: 7, ProgramID: 42, Mode: state.ModeAuto}
	dev := func(ifindex int, prog uint32) *state.Device {
		return &state.Device{Ifindex: ifindex, XDPProgramID: ebpf.ProgramID(prog)}
	}
	lk := func(ifindex int, prog uint32) *state.LinkEvidence {
		return &state.LinkEvidence{Ifindex: ifindex, ProgramID: ebpf.ProgramID(prog)}
	}
	detached := rec
	detached.OperatorDetached = true
	for _, c := range []struct {
		name string
		o    state.Observation
		want state.Unfiltered // "" for filtered
	}{
		{"attached, link info", state.Observation{Record: rec, Device: dev(7, 42), LinkPinned: true, Link: lk(7, 42)}, ""},
		{"attached, record", state.Observation{Record: rec, Device: dev(7, 42), LinkPinned: true}, ""},
		{"upgraded: the link runs a newer program than recorded", state.Observation{Record: rec, Device: dev(7, 43), LinkPinned: true, Link: lk(7, 43)}, ""},
		{"operator-detached", state.Observation{Record: detached, Device: dev(7, 0), LinkPinned: false}, state.UnfilteredOperatorDetached},
		{"operator-detached wins over a missing device", state.Observation{Record: detached}, state.UnfilteredOperatorDetached},
		{"no device", state.Observation{Record: rec, LinkPinned: true, Link: lk(0, 42)}, state.UnfilteredNoDevice},
		{"no pin", state.Observation{Record: rec, Device: dev(7, 0)}, state.UnfilteredNoLink},
		{"re-created, link info", state.Observation{Record: rec, Device: dev(9, 0), LinkPinned: true, Link: lk(0, 42)}, state.UnfilteredDefunctLink},
		{"re-created, record", state.Observation{Record: rec, Device: dev(9, 0), LinkPinned: true}, state.UnfilteredDefunctLink},
		{"renamed onto the name, link info", state.Observation{Record: rec, Device: dev(9, 0), LinkPinned: true, Link: lk(7, 42)}, state.UnfilteredDefunctLink},
		{"foreign program, link info", state.Observation{Record: rec, Device: dev(9, 77), LinkPinned: true, Link: lk(0, 42)}, state.UnfilteredForeignProgram},
		{"foreign program, record", state.Observation{Record: rec, Device: dev(9, 77), LinkPinned: true}, state.UnfilteredForeignProgram},
		{"link says attached, device runs nothing", state.Observation{Record: rec, Device: dev(7, 0), LinkPinned: true, Link: lk(7, 42)}, state.UnfilteredDefunctLink},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := state.Judge(c.o)
			if v.Filtered != (c.want == "") || v.Reason != c.want {
				t.Fatalf("%v, want %q", v, c.want)
			}
			if !v.Filtered && v.Detail == "" {
				t.Fatal("no detail")
			}
		})
	}
}
