//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * trafficgen.c: the packet-rate benchmark's generator. BPF_PROG_TEST_RUN
 * with BPF_F_TEST_XDP_LIVE_FRAMES runs gen_xdp on a template frame Repeat
 * times; XDP_TX sends each frame out of the ingress device named in the
 * context (the client's veth), so it arrives on the gateway as real
 * traffic. Each frame is rewritten into flow i = counter % nflows:
 *
 *   IPv4: source 203.0.113.(i & 255), destination 198.51.100.(2 + (i >> 8) % 250),
 *         destination port 1024 + (i >> 8) / 250
 *   IPv6: source 2001:db8:3::(i) (the low 32 bits), destination and port kept
 *
 * so a million distinct flows need one template, not a million frames. The
 * mapping lives here and in flows.go; the benchmark fills sessions with
 * the same keys. Destinations avoid .0, .1 (the gateway) and .255 so that
 * every flow is forwardable.
 *
 * The kernel initialises a page from the template only once: a frame that
 * was forwarded comes back recycled with the next hop's MAC addresses and
 * a lower TTL. So each frame gets the template's Ethernet header and hop
 * limit back, the IPv4 header checksum is computed afresh, and the IPv6
 * UDP checksum is fixed incrementally from the frame's current source.
 */

#include "bpf_defs.h"
#include "proto.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Number of distinct flows; set before load. */
volatile const __u32 nflows = 1;
/* The template's Ethernet header; its addresses are restored. */
volatile const __u8 eth_hdr[14] = {};
/* Leave the IPv4 destination and port of the template alone. */
volatile const __u8 keep_dst = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* RFC 1624: HC' = ~(~HC + ~m + m') over each changed 16-bit word. */
static __always_inline __u16 csum_replace32(__u16 check, __be32 from, __be32 to)
{
	__u32 s = (__u16)~check;
	s += (__u16)~(from & 0xffff) + (__u16)~(from >> 16);
	s += (to & 0xffff) + (to >> 16);
	return ~csum_fold(s);
}

SEC("xdp")
int gen_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	__u64 *cnt = bpf_map_lookup_elem(&counter, &zero);
	if (!cnt)
		return XDP_ABORTED;
	__u32 i = (__u32)(*cnt % nflows);
	*cnt += 1;

	/* Byte by byte: each read of the volatile constant is a load. */
	__u8 *e = data;
#pragma unroll
	for (int k = 0; k < 2 * ETH_ALEN; k++) /* the addresses, not the type */
		e[k] = eth_hdr[k];
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return XDP_ABORTED;
		__u8 *src = (__u8 *)&ip->saddr, *dst = (__u8 *)&ip->daddr;
		src[0] = 203, src[1] = 0, src[2] = 113, src[3] = i & 255;
		if (!keep_dst) {
			dst[0] = 198, dst[1] = 51, dst[2] = 100, dst[3] = 2 + (i >> 8) % 250;
			udp->dest = bpf_htons(1024 + (i >> 8) / 250);
		}
		ip->ttl = 64;
		ip->check = 0;
		__u16 *w = (__u16 *)ip;
		__u32 sum = 0;
#pragma unroll
		for (int k = 0; k < 10; k++)
			sum += w[k];
		ip->check = ~csum_fold(sum);
		udp->check = 0; /* optional over IPv4 */
		return XDP_TX;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end)
			return XDP_ABORTED;
		__be32 *low = (__be32 *)&ip6->saddr[12];
		__be32 old = *low, new = __builtin_bswap32(i);
		*low = new;
		ip6->hop_limit = 64;
		/* The source is in the UDP checksum's pseudo-header. */
		udp->check = csum_replace32(udp->check, old, new);
		return XDP_TX;
	}
	return XDP_ABORTED;
}

/* The floor: no work at all. Also the private side's sink, whose
 * interface counters count what was forwarded. */
SEC("xdp")
int drop_xdp(struct xdp_md *ctx)
{
	return XDP_DROP;
}
