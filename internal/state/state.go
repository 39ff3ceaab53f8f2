// Package state owns the pinned-state contract between aegis-loader, the
// daemons and the operator tools: where the pins live, what the maps are
// called, the layout of their keys and values, and how to open them.
//
// The loader creates and pins the maps (see package loader); everything else
// opens them with Open and reads or writes sessions through Maps. No other
// package spells a pin path or a map layout.
package state

import "errors"

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
