// Package nextbuild is aegis.c compiled with a different refresh
// granularity: a genuinely different program over the same map layout.
//
// Binaries built with the aegis_nextbuild tag embed it instead of package
// bpf's object, which gives the upgrade tests a "new release" of the data
// path to swap in while traffic flows. Nothing in a normal build uses it.
package nextbuild

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -DAEGIS_REFRESH_NS=50000000ULL" Aegis ../aegis.c -- -I../include
