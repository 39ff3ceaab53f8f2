// Package release records the released versions of Aegis Agent that this
// tree must upgrade from. The upgrade tests build each one from its commit
// (so a clone needs the full history) and load the current build over its
// running data path.
//
// Cutting a release adds it here: its version, the commit it was built
// from and the layout version its data path pins (AEGIS_LAYOUT_VERSION of
// that commit's bpf/aegis.c).
package release

// Release is one released version.
type Release struct {
	// Version is the release's name, linked into its binaries as
	// internal/cli.version.
	Version string
	// Commit is the full hash of the commit the release was built from.
	Commit string
	// LayoutVersion is the layout version of the pins its loader makes.
	LayoutVersion uint32
}

// Previous is the latest release before this tree: the one an operator
// upgrades from.
var Previous = Release{
	Version:       "v0.1.0",
	Commit:        "fdfbd6bc4e59b691a1c966680d9d3561bc2063bc",
	LayoutVersion: 1,
}
