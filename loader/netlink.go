package loader

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// attachedMode asks the kernel how XDP is attached to an interface.
func attachedMode(ifindex int) (Mode, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return "", fmt.Errorf("inspect interface %d: %w", ifindex, err)
	}
	if x := l.Attrs().Xdp; x != nil {
		switch x.AttachMode {
		case nl.XDP_ATTACHED_DRV:
			return ModeNative, nil
		case nl.XDP_ATTACHED_SKB:
			return ModeGeneric, nil
		}
	}
	return ModeAuto, nil
}
