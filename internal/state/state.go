// Package state owns the pinned-state contract between aegis-loader, the
// daemons and the operator tools: where the pins live, what the maps are
// called, the layout of their keys and values, and how to open them.
//
// The loader creates and pins the maps (see package loader); everything else
// opens them with Open and reads or writes sessions through Maps. No other
// package spells a pin path or a map layout.
package state

import (
	"errors"
	"path/filepath"
	"strings"
)

// DefaultPinPath is where the loader pins its maps and links unless told
// otherwise (flag --pin-path, environment AEGIS_PIN_PATH).
const DefaultPinPath = "/sys/fs/bpf/aegis"

// Map names: the pin file names under the pin path, and the names the kernel
// and bpftool show.
const (
	MapSessionsV4 = "sessions_v4"
	MapSessionsV6 = "sessions_v6"
	MapAllowV4    = "allow_v4"
	MapAllowV6    = "allow_v6"
	MapConfig     = "config"
	MapStats      = "stats"
)

// MapIfaces (ifaces.go) is pinned beside them.

// MapNames lists every pinned map.
var MapNames = []string{MapSessionsV4, MapSessionsV6, MapAllowV4, MapAllowV6, MapConfig, MapStats, MapIfaces}

// ProgramPin is the pin of the XDP program the links run. An upgrade pins
// the new build as ProgramNextPin, moves the links to it, then renames it
// over ProgramPin.
const (
	ProgramPin     = "program"
	ProgramNextPin = "program_next"
)

// LinksDir is the directory under the pin path holding one pinned XDP
// bpf_link per interface, named after the interface.
const LinksDir = "links"

// MapPath returns the pin of the named map.
func MapPath(pinPath, name string) string { return filepath.Join(pinPath, name) }

// LinkPath returns the pin of the XDP link on the named interface.
func LinkPath(pinPath, ifname string) string {
	return filepath.Join(pinPath, LinksDir, LinkPinName(ifname))
}

// LinkTempPath is where a new link for the interface is pinned before it
// is renamed over LinkPath, so that the pin is replaced in one step. No
// interface name contains ':', so it never collides with a LinkPath.
func LinkTempPath(pinPath, ifname string) string { return LinkPath(pinPath, ifname) + ":new" }

// IsTempLinkPin reports whether a file name in LinksDir is a LinkTempPath
// left by an interrupted attach.
func IsTempLinkPin(name string) bool { return strings.Contains(name, ":") }

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

// Errors returned by this package; test for them with errors.Is.
var (
	// ErrNotLoaded means the pin directory or one of its maps is missing:
	// aegis-loader has not run, or was unloaded.
	ErrNotLoaded = errors.New("aegis data path is not loaded")
	// ErrPermission means the pins exist but may not be opened: the caller
	// lacks CAP_BPF or membership of the pins' group.
	ErrPermission = errors.New("permission denied")
	// ErrIncompatible means a pinned map's layout differs from this build's.
	ErrIncompatible = errors.New("pinned map is incompatible with this build")
	// ErrFull means the sessions map is at capacity; nothing was changed.
	ErrFull = errors.New("sessions map is full")
	// ErrNotFound means no session has the given key.
	ErrNotFound = errors.New("session not found")
	// ErrInvalid means a key, session or rule is malformed; nothing was changed.
	ErrInvalid = errors.New("invalid argument")
)
