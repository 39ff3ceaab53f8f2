package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The layout of a pin directory:
//
//	<pin path>/               0750 root:aegis
//	    sessions_v4 ...       one pin per map (MapNames)
//	    program               the XDP program the links run
//	    program_next          the next build, only during an upgrade
//	    program_egress        the tcx egress program of the reply path
//	    program_locality      the locality question explain asks (never attached)
//	    <map>_next            a migrated map, only during an upgrade
//	    links/                0700 root:root
//	        <ifname>          one XDP bpf_link per interface (LinkPinName)
//	        <ifname>:egress   the tcx egress bpf_link of the reply path
//
// Every path into it is built here, so that the loader, the daemons and
// the tests agree on it.

// DefaultPinPath is where the loader pins its maps and links unless told
// otherwise (flag --pin-path, environment AEGIS_PIN_PATH).
const DefaultPinPath = "/sys/fs/bpf/aegis"

// Map names: the pin file names under the pin path, and the names the kernel
// and bpftool show. They are the names of the maps in aegis.c; a test checks
// them against the object.
const (
	MapSessionsV4 = "sessions_v4"
	MapSessionsV6 = "sessions_v6"
	MapAllowV4    = "allow_v4"
	MapAllowV6    = "allow_v6"
	MapConfig     = "config"
	MapStats      = "stats"
	MapSweepSeq   = "sweep_seq"
	// MapFlowsV4 and MapFlowsV6 hold the flows the gateway opened outbound,
	// keyed by their reply; written by the egress program.
	MapFlowsV4 = "flows_v4"
	MapFlowsV6 = "flows_v6"
	// MapFrags holds the fragmented datagrams whose first fragment passed.
	MapFrags = "frags"
	// MapEvents is the ring buffer of sampled verdict events; MapEventLimits
	// the per-CPU rate limiter buckets and their counters (emitted,
	// suppressed, lost).
	MapEvents      = "events"
	MapEventLimits = "event_limits"
	// MapAllowHits counts, per CPU, the packets each allow rule admitted,
	// by the rule's id (allowhits.go).
	MapAllowHits = "allow_hits"
	// MapTombsV4 and MapTombsV6 hold the tombstones of removed sessions,
	// keyed like the sessions (tomb.go); written by the daemons, read and
	// refreshed by the egress program.
	MapTombsV4 = "tombs_v4"
	MapTombsV6 = "tombs_v6"
	// MapPortMarks says at which destination ports a session or a flow
	// may be found (marks.go); the daemons mark sessions' ports, the data
	// path flows'.
	MapPortMarks = "port_marks"
)

// MapIfaces (ifaces.go) is pinned beside them.

// MapNames lists every pinned map.
var MapNames = []string{MapSessionsV4, MapSessionsV6, MapAllowV4, MapAllowV6, MapConfig, MapStats, MapSweepSeq,
	MapFlowsV4, MapFlowsV6, MapFrags, MapIfaces, MapEvents, MapEventLimits, MapAllowHits,
	MapTombsV4, MapTombsV6, MapPortMarks}

// ProgramPin is the pin of the XDP program the links run. An upgrade pins
// the new build as ProgramNextPin, moves the links to it, then renames it
// over ProgramPin.
const (
	ProgramPin     = "program"
	ProgramNextPin = "program_next"
	// EgressProgramPin holds the egress program the egress links run, so
	// that a loader without CAP_SYS_ADMIN (which opening a program by id
	// needs) can tell this build's from another; EgressProgramNextPin
	// stages a new one.
	EgressProgramPin     = "program_egress"
	EgressProgramNextPin = "program_egress_next"
	// LocalityProgramPin holds the program that answers the data path's
	// "is this destination local" for explain (locality.go). Nothing runs
	// it but BPF_PROG_TEST_RUN; it uses no map.
	LocalityProgramPin = "program_locality"
)

// LinksDir is the directory under the pin path holding one pinned XDP
// bpf_link per interface, named after the interface.
const LinksDir = "links"

// EgressLinkSuffix ends the pin name of an interface's tcx egress link,
// beside its XDP link in LinksDir. The kernel refuses ':' in interface
// names (dev_valid_name), so no interface's XDP pin can take this name,
// and bpffs accepts it (it refuses only '.').
const EgressLinkSuffix = ":egress"

// MapPath returns the pin of the named map.
func MapPath(pinPath, name string) string { return filepath.Join(pinPath, name) }

// MapNextPath returns the pin an upgrade stages the migrated copy of the
// named map at, until the links run the program that uses it and it is
// renamed over MapPath.
func MapNextPath(pinPath, name string) string { return filepath.Join(pinPath, name+"_next") }

// ProgramPath returns the pin of the program the links run.
func ProgramPath(pinPath string) string { return filepath.Join(pinPath, ProgramPin) }

// ProgramNextPath returns the pin an upgrade stages the next build at.
func ProgramNextPath(pinPath string) string { return filepath.Join(pinPath, ProgramNextPin) }

// EgressProgramPath returns the pin of the egress program.
func EgressProgramPath(pinPath string) string { return filepath.Join(pinPath, EgressProgramPin) }

// EgressProgramNextPath returns the pin a new egress program is staged at.
func EgressProgramNextPath(pinPath string) string {
	return filepath.Join(pinPath, EgressProgramNextPin)
}

// LocalityProgramPath returns the pin of the locality program.
func LocalityProgramPath(pinPath string) string { return filepath.Join(pinPath, LocalityProgramPin) }

// LocalityProgramNextPath is where a new locality program is pinned before
// it is renamed over LocalityProgramPath.
func LocalityProgramNextPath(pinPath string) string {
	return filepath.Join(pinPath, LocalityProgramPin+"_next")
}

// LinksPath returns the directory of the link pins.
func LinksPath(pinPath string) string { return filepath.Join(pinPath, LinksDir) }

// LinkPath returns the pin of the XDP link on the named interface.
func LinkPath(pinPath, ifname string) string {
	return filepath.Join(pinPath, LinksDir, LinkPinName(ifname))
}

// EgressLinkPath returns the pin of the tcx egress link on the named
// interface: the program that records the flows whose replies pass.
func EgressLinkPath(pinPath, ifname string) string {
	return filepath.Join(pinPath, LinksDir, LinkPinName(ifname)+EgressLinkSuffix)
}

// LinkTempPath is where a new link for the interface is pinned before it
// is renamed over LinkPath, so that the pin is replaced in one step. No
// interface name contains ':', so it never collides with a LinkPath.
func LinkTempPath(pinPath, ifname string) string { return LinkPath(pinPath, ifname) + TempLinkSuffix }

// TempLinkSuffix ends the name of a link pin that is about to be renamed
// over the pin without it.
const TempLinkSuffix = ":new"

// IsTempLinkPin reports whether a file name in LinksDir is a LinkTempPath
// left by an interrupted attach.
func IsTempLinkPin(name string) bool { return strings.HasSuffix(name, TempLinkSuffix) }

// FilePins returns every pin directly under the pin path, programs first,
// staged ones included: what a full unload removes besides the links.
func FilePins(pinPath string) []string {
	out := []string{ProgramPath(pinPath), ProgramNextPath(pinPath),
		EgressProgramPath(pinPath), EgressProgramNextPath(pinPath),
		LocalityProgramPath(pinPath), LocalityProgramNextPath(pinPath)}
	for _, name := range MapNames {
		out = append(out, MapPath(pinPath, name), MapNextPath(pinPath, name))
	}
	return out
}

// LinkedInterfaces returns the names of the interfaces that have a pinned
// XDP link, in directory order; none if the links directory does not exist.
func LinkedInterfaces(pinPath string) ([]string, error) {
	return linked(pinPath, false)
}

// EgressLinkedInterfaces returns the names of the interfaces that have a
// pinned egress link, in directory order.
func EgressLinkedInterfaces(pinPath string) ([]string, error) {
	return linked(pinPath, true)
}

func linked(pinPath string, egress bool) ([]string, error) {
	entries, err := os.ReadDir(LinksPath(pinPath))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", LinksPath(pinPath), err)
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if IsTempLinkPin(e.Name()) {
			continue
		}
		base, isEgress := strings.CutSuffix(e.Name(), EgressLinkSuffix)
		if isEgress != egress {
			continue
		}
		names = append(names, IfnameFromLinkPin(base))
	}
	return names, nil
}

// TempLinkPins returns the LinkTempPath pins in LinksDir: an attach in
// progress, or left by an interrupted one.
func TempLinkPins(pinPath string) ([]string, error) {
	entries, err := os.ReadDir(LinksPath(pinPath))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", LinksPath(pinPath), err)
	}
	var paths []string
	for _, e := range entries {
		if IsTempLinkPin(e.Name()) {
			paths = append(paths, filepath.Join(LinksPath(pinPath), e.Name()))
		}
	}
	return paths, nil
}

// LinkPinName is the pin file name for an interface. bpffs refuses names
// containing a dot, which interface names may have (eth0.100), so "%" and
// "." are escaped as %25 and %2e.
func LinkPinName(ifname string) string {
	return strings.NewReplacer("%", "%25", ".", "%2e").Replace(ifname)
}

// IfnameFromLinkPin reverses LinkPinName.
func IfnameFromLinkPin(name string) string {
	return strings.NewReplacer("%2e", ".", "%25", "%").Replace(name)
}
