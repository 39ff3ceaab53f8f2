package loader

import (
	"fmt"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// XDPState is what runs at an interface's XDP hook, as the kernel reports
// it. A program attached through a bpf_link cannot be removed with
// "ip link set dev X xdp off" (the kernel refuses: EBUSY); one attached
// through netlink has no link. The fix differs, so the two are told
// apart: netlink reports the program, and the bpf_link of the same
// program on the same ifindex, if any, is the link that holds it.
type XDPState struct {
	Attached  bool   `json:"attached"`
	ProgramID uint32 `json:"program_id,omitempty"`
	Mode      Mode   `json:"mode,omitempty"`
	// LinkID is the bpf_link holding the program; 0 for a netlink
	// attachment.
	LinkID uint32 `json:"link_id,omitempty"`
	// LinksUnknown: the links could not be listed (that needs
	// CAP_SYS_ADMIN), so a zero LinkID tells nothing.
	LinksUnknown bool `json:"links_unknown,omitempty"`
}

// xdpState inspects the XDP hook of an interface.
func xdpState(ifindex int) (XDPState, error) {
	var st XDPState
	nlink, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return st, fmt.Errorf("inspect interface %d: %w", ifindex, err)
	}
	x := nlink.Attrs().Xdp
	if x == nil || !x.Attached || x.ProgId == 0 {
		return st, nil
	}
	st.Attached, st.ProgramID = true, x.ProgId
	switch x.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		st.Mode = ModeNative
	case nl.XDP_ATTACHED_SKB:
		st.Mode = ModeGeneric
	case nl.XDP_ATTACHED_HW:
		st.Mode = "offload"
	}
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || info.Type != link.XDPType || uint32(info.Program) != st.ProgramID {
			continue
		}
		if xi := info.XDP(); xi != nil && int(xi.Ifindex) == ifindex {
			st.LinkID = uint32(info.ID)
			break
		}
	}
	st.LinksUnknown = st.LinkID == 0 && it.Err() != nil
	return st, nil
}

// foreignXDPHint says how to remove what holds an interface's XDP hook.
func foreignXDPHint(name string, ifindex int) string {
	st, err := xdpState(ifindex)
	switch {
	case err != nil || !st.Attached:
		return fmt.Sprintf("inspect it with \"bpftool net show dev %s\"", name)
	case st.LinksUnknown:
		return fmt.Sprintf("program %d: \"bpftool net show dev %s\" shows it; if it is held by a bpf_link (\"bpftool link list\"), remove it with its owner or \"bpftool link detach id ID\", else \"bpftool net detach xdp dev %s\"",
			st.ProgramID, name, name)
	case st.LinkID != 0:
		return fmt.Sprintf("program %d is held by bpf_link %d (another tool's): find its owner with \"bpftool link show id %d\" and remove it with that tool, or \"bpftool link detach id %d\" (\"ip link set dev %s xdp off\" cannot remove a bpf_link)",
			st.ProgramID, st.LinkID, st.LinkID, st.LinkID, name)
	default:
		return fmt.Sprintf("program %d is attached through netlink: inspect it with \"bpftool net show dev %s\" and detach it with \"bpftool net detach xdp dev %s\" (or \"ip link set dev %s xdp off\")",
			st.ProgramID, name, name, name)
	}
}
