//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * reference.c: the least work an XDP session filter can do, as the
 * benchmarks' anchor beside the data path. Ethernet, IPv4 without options
 * or fragments, TCP, one hash lookup of (src, dst, dport, proto): found
 * passes, everything else drops. No VLANs, no IPv6, no counters, no
 * timestamps, no bypasses: whatever aegis_xdp costs beyond this is the
 * price of what it does beyond this.
 */

#include "bpf_defs.h"
#include "proto.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct key {
	__u8 src[4];
	__u8 dst[4];
	__u16 dport;
	__u8 proto;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct key);
	__type(value, __u64);
} sessions SEC(".maps");

SEC("xdp")
int reference_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *th = (void *)(ip + 1);

	if ((void *)(th + 1) > data_end)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ver_ihl != 0x45 ||
	    ip->protocol != IPPROTO_TCP)
		return XDP_DROP;

	struct key k = {.dport = bpf_ntohs(th->dest), .proto = IPPROTO_TCP};
	__builtin_memcpy(k.src, &ip->saddr, 4);
	__builtin_memcpy(k.dst, &ip->daddr, 4);
	return bpf_map_lookup_elem(&sessions, &k) ? XDP_PASS : XDP_DROP;
}
