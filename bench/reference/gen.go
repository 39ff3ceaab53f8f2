// Package reference is the benchmarks' "least work possible" XDP program
// (reference.c): Ethernet, IPv4, TCP and one hash lookup.
package reference

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror" -type key Reference reference.c -- -I../../bpf/include
