// Package bpf holds the Aegis XDP program (aegis.c), its bpf2go-generated
// loader, and model.go, the Go reference model of its verdict.
//
// The generated aegis_bpfel.go and aegis_bpfel.o are committed so that
// building needs no clang; `make generate` recreates them byte for byte.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror" -type session_key_v4 -type session_key_v6 -type session_value -type allow_key_v4 -type allow_key_v6 -type allow_value -type allow_port -type config_value -type stats_value -type flow_key_v4 -type flow_key_v6 -type flow_value -type frag_key -type frag_value -type sweep_seq_value -type reason -type verdict -type layout -type limits -type attach_mode -type iface_key -type iface_value -type event -type event_kind -type event_limit -type tomb_value -type tomb_cause -type mark_slot Aegis aegis.c -- -I./include
