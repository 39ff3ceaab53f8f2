package state

// The one definition of "filtered": a configured interface X is filtered
// iff
//
//   - it is not operator-detached,
//   - a device named X exists,
//   - links/X is pinned,
//   - the device runs no XDP program but ours, and
//   - the link is attached to X's current ifindex.
//
// The kernel detaches an XDP bpf_link when its device is unregistered and
// the link then reports ifindex 0 (a defunct link); a device re-created or
// renamed to X has a new ifindex. Both leave a pin that looks healthy to
// anyone who only checks that it exists, and the interface passes every
// packet.
//
// Evidence differs by privilege, the rule does not. Opening a pinned link
// takes write access to its pin (the kernel opens links read-write only),
// which the unprivileged daemons must not have: that would let them
// detach the filter. So a process that may open links/X compares the
// link's own info with the device; one that may not (the control plane,
// the reaper) compares the ifindex and program id the loader recorded in
// MapIfaces when it attached that link, which it keeps current across
// upgrades. Both read the device over netlink, which needs no privilege.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// Unfiltered says why a configured interface is not filtered.
type Unfiltered string

// Reasons an interface is not filtered.
const (
	// UnfilteredOperatorDetached: "aegis-loader unload -i" detached it.
	UnfilteredOperatorDetached Unfiltered = "operator-detached"
	// UnfilteredNoDevice: no device of that name exists; nothing passes
	// through it either, but it is reported so that a missing public
	// interface is not silent.
	UnfilteredNoDevice Unfiltered = "missing device"
	// UnfilteredNoLink: nothing is pinned at links/<name>.
	UnfilteredNoLink Unfiltered = "no link"
	// UnfilteredDefunctLink: the pinned link is attached to no device, or
	// to another device than the one now called by that name.
	UnfilteredDefunctLink Unfiltered = "defunct link"
	// UnfilteredForeignProgram: the device runs an XDP program that is not
	// the one our link attached.
	UnfilteredForeignProgram Unfiltered = "foreign program"
)

// Device is what netlink says about the device of a configured name.
type Device struct {
	Ifindex int
	// XDPProgramID is the XDP program attached to the device; 0 for none.
	XDPProgramID ebpf.ProgramID
}

// LinkEvidence is what a pinned link says about itself.
type LinkEvidence struct {
	// Ifindex is the device the link is attached to; 0 when defunct.
	Ifindex   int
	ProgramID ebpf.ProgramID
}

// Observation is everything Judge needs about one configured interface.
type Observation struct {
	Record Interface
	// Device is nil when no device has the name.
	Device *Device
	// LinkPinned reports that links/<name> exists.
	LinkPinned bool
	// Link is nil when the observer may not open the link; Judge then
	// relies on Record.
	Link *LinkEvidence
}

// Filtering is the verdict on one configured interface.
type Filtering struct {
	Interface Interface `json:"interface"`
	Filtered  bool      `json:"filtered"`
	// Reason and Detail are empty when Filtered.
	Reason Unfiltered `json:"reason,omitempty"`
	Detail string     `json:"detail,omitempty"`
}

// String is one line for an operator: "eth0: defunct link (...)".
func (f Filtering) String() string {
	if f.Filtered {
		return f.Interface.Name + ": filtered"
	}
	return fmt.Sprintf("%s: %s (%s)", f.Interface.Name, f.Reason, f.Detail)
}

// Judge applies the definition to one observation.
func Judge(o Observation) Filtering {
	f := Filtering{Interface: o.Record}
	no := func(r Unfiltered, format string, args ...any) Filtering {
		f.Reason, f.Detail = r, fmt.Sprintf(format, args...)
		return f
	}
	name := o.Record.Name
	attachedTo, ours := o.Record.Ifindex, o.Record.ProgramID
	if o.Link != nil {
		attachedTo, ours = o.Link.Ifindex, o.Link.ProgramID
	}
	dev := o.Device
	switch {
	case o.Record.OperatorDetached:
		return no(UnfilteredOperatorDetached, "detached by \"aegis-loader unload -i %s\"; \"aegis-loader load\" attaches it again", name)
	case dev == nil:
		return no(UnfilteredNoDevice, "no device named %s", name)
	case !o.LinkPinned:
		return no(UnfilteredNoLink, "nothing pinned at %s/%s", LinksDir, LinkPinName(name))
	case dev.XDPProgramID != 0 && dev.XDPProgramID != ours:
		return no(UnfilteredForeignProgram, "%s runs XDP program %d, ours is %d", name, dev.XDPProgramID, ours)
	case attachedTo == 0:
		return no(UnfilteredDefunctLink, "the pinned link's device went away; %s is now ifindex %d", name, dev.Ifindex)
	case attachedTo != dev.Ifindex:
		return no(UnfilteredDefunctLink, "the pinned link is attached to ifindex %d, %s is now ifindex %d", attachedTo, name, dev.Ifindex)
	case dev.XDPProgramID == 0:
		return no(UnfilteredDefunctLink, "%s (ifindex %d) runs no XDP program", name, dev.Ifindex)
	}
	f.Filtered = true
	return f
}

// Observe gathers the evidence about one configured interface: the
// device over netlink, the pin, and the link's info if this process may
// open it.
func Observe(pinPath string, rec Interface) (Observation, error) {
	o := Observation{Record: rec}
	nl, err := netlink.LinkByName(rec.Name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
	case err != nil:
		return o, fmt.Errorf("inspect interface %s: %w", rec.Name, err)
	default:
		o.Device = &Device{Ifindex: nl.Attrs().Index}
		if x := nl.Attrs().Xdp; x != nil && x.Attached {
			o.Device.XDPProgramID = ebpf.ProgramID(x.ProgId)
		}
	}

	path := LinkPath(pinPath, rec.Name)
	_, err = os.Lstat(path)
	switch {
	case err == nil:
		o.LinkPinned = true
	case errors.Is(err, fs.ErrNotExist):
		return o, nil
	case errors.Is(err, fs.ErrPermission):
		// The links directory of an older loader is not searchable by
		// the pins' group; the record decides.
		o.LinkPinned = rec.Ifindex != 0
		return o, nil
	default:
		return o, fmt.Errorf("stat %s: %w", path, err)
	}
	lk, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, fs.ErrNotExist) {
		return o, nil // not ours to open, or replaced meanwhile: the record decides
	}
	if err != nil {
		return o, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return o, fmt.Errorf("inspect link %s: %w", path, err)
	}
	o.Link = &LinkEvidence{ProgramID: info.Program}
	if x := info.XDP(); x != nil {
		o.Link.Ifindex = int(x.Ifindex)
	}
	return o, nil
}

// CheckInterfaces judges every configured interface under pinPath.
// Returns ErrNotLoaded when nothing records them (see OpenInterfaces).
func CheckInterfaces(pinPath string) ([]Filtering, error) {
	recs, err := ReadInterfaces(pinPath)
	if err != nil {
		return nil, err
	}
	out := make([]Filtering, 0, len(recs))
	for _, r := range recs {
		o, err := Observe(pinPath, r)
		if err != nil {
			return nil, err
		}
		out = append(out, Judge(o))
	}
	return out, nil
}

// UnfilteredOnly returns the verdicts that are not filtered.
func UnfilteredOnly(verdicts []Filtering) []Filtering {
	var out []Filtering
	for _, f := range verdicts {
		if !f.Filtered {
			out = append(out, f)
		}
	}
	return out
}

// Summary is one line naming every unfiltered interface and why, or ""
// when all are filtered.
func Summary(verdicts []Filtering) string {
	var parts []string
	for _, f := range UnfilteredOnly(verdicts) {
		parts = append(parts, f.String())
	}
	return strings.Join(parts, "; ")
}

// NotFiltered judges every configured interface under pinPath and returns
// the verdicts and one line naming those that are not filtered and why:
// "" when every configured interface is filtered, which is also the case
// when none is configured (a load always configures at least one). Not
// being able to tell is reported as not filtered: pins without the record
// (made by an older loader; the next load adds it) or a failed check.
func NotFiltered(pinPath string) ([]Filtering, string) {
	verdicts, err := CheckInterfaces(pinPath)
	switch {
	case errors.Is(err, ErrNotLoaded):
		return nil, "no record of the configured interfaces: run aegis-loader load"
	case err != nil:
		return nil, "cannot check the configured interfaces: " + err.Error()
	}
	return verdicts, Summary(verdicts)
}
