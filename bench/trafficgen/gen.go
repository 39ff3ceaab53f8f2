// Package trafficgen is the packet-rate benchmark's generator and counter
// (trafficgen.c): an XDP program run in BPF_PROG_TEST_RUN's live-frames
// mode that gives each frame the next flow of a fixed set and transmits
// it, and an empty XDP_DROP program for the floor and the private-side
// sink.
package trafficgen

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror" Trafficgen trafficgen.c -- -I../../bpf/include
