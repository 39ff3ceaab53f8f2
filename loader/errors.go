package loader

import (
	"errors"

	"github.com/aegis-agent/aegis/internal/state"
)

// Errors returned by the loader. Each is wrapped with the object it concerns
// and the fix, so that the one line the command prints tells the operator
// what to do.
var (
	// ErrNoBPFFS means the pin path is not on a mounted bpf filesystem.
	ErrNoBPFFS = errors.New("no bpf filesystem")
	// ErrUnsafePinPath means the pin directory, a directory on the way to
	// it, or an entry in it is a symlink, of the wrong type, not owned by
	// root, or in a directory other users may write without the sticky
	// bit: another user could have the loader chown, chmod or pin on their
	// behalf.
	ErrUnsafePinPath = errors.New("unsafe pin path")
	// ErrNotRoot means the loader does not run as root, whose pins it makes.
	ErrNotRoot = errors.New("not running as root")
	// ErrNoInterface means a named interface does not exist.
	ErrNoInterface = errors.New("interface not found")
	// ErrNoGroup means the group that should own the pins does not exist.
	ErrNoGroup = errors.New("group not found")
	// ErrNoXDPLink means the kernel cannot attach XDP through a bpf_link.
	ErrNoXDPLink = errors.New("kernel has no XDP bpf_link support")
	// ErrNoTCX means the kernel cannot attach the reply path's egress
	// program (tcx links, Linux 6.6).
	ErrNoTCX = errors.New("kernel has no tcx link support")
	// ErrXDPBusy means another XDP program, not ours, holds the interface.
	ErrXDPBusy = errors.New("interface already has a foreign XDP program")
	// ErrModeUnsupported means the driver cannot run XDP in the mode asked.
	ErrModeUnsupported = errors.New("XDP mode not supported by the driver")
	// ErrModeChange means the interface is attached in another mode; a mode
	// change needs a detach, which the loader does not do behind the
	// operator's back because it leaves the interface unfiltered.
	ErrModeChange = errors.New("interface is attached in another XDP mode")
	// ErrCapacityChange means --max-sessions differs from the pinned maps.
	ErrCapacityChange = errors.New("sessions map capacity differs from --max-sessions")
	// ErrLockout means the filter would drop the connection the operator
	// runs the loader through; the message names the allow rule to add.
	ErrLockout = errors.New("refusing to cut the operator's own connection")
	// ErrIncompatible means a pinned map's layout differs from this build's.
	ErrIncompatible = state.ErrIncompatible
	// ErrInvalid means a flag's value is malformed.
	ErrInvalid = state.ErrInvalid
)
