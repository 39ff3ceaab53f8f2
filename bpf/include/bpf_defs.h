/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * bpf_defs.h: the few kernel UAPI types, helper declarations and BTF map
 * macros the Aegis XDP program needs.
 *
 * Declared here instead of including <linux/bpf.h> and libbpf's headers so
 * that the object is generated from this tree and clang alone: no
 * architecture-specific include paths, no dependency on the libbpf version
 * of the build machine, and `make generate` reproduces the committed object
 * byte for byte.
 */
#pragma once

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;

/* UAPI: enum xdp_action and struct xdp_md. */
enum xdp_action {
	XDP_ABORTED = 0,
	XDP_DROP,
	XDP_PASS,
	XDP_TX,
	XDP_REDIRECT,
};

/* UAPI: the start of struct __sk_buff, up to the fields read here. */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
};

/* UAPI: enum tcx_action_base. TCX_NEXT hands the packet to the next
 * program on the hook, or lets it pass when there is none. */
#define TCX_NEXT -1

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

/* UAPI: enum bpf_map_type, the values used here. */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_LPM_TRIE = 11,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* UAPI: the lock the kernel finds by name in a map value's BTF, taken by
 * BPF_F_LOCK lookups and updates from user space. */
struct bpf_spin_lock {
	__u32 val;
};

/* UAPI: map creation flags. */
#define BPF_F_NO_PREALLOC (1U << 0)

/* UAPI: bpf_map_update_elem flags. */
#define BPF_ANY 0
#define BPF_NOEXIST 1

/* UAPI: struct bpf_fib_lookup, the parameters of bpf_fib_lookup(). Only
 * the input fields are named; the output fields overlay them. */
#define AF_INET 2
#define AF_INET6 10

struct bpf_fib_lookup {
	__u8 family;
	__u8 l4_protocol;
	__be16 sport;
	__be16 dport;
	__u16 tot_len; /* in: L3 length for the MTU check, 0: none */
	__u32 ifindex; /* in: the ingress interface */
	__u32 flowinfo; /* in: tos (IPv4) or flow label and class (IPv6) */
	union {
		__be32 ipv4_src;
		__u32 ipv6_src[4];
	};
	union {
		__be32 ipv4_dst;
		__u32 ipv6_dst[4];
	};
	__u32 tbid; /* out: VLAN protocol and TCI */
	__u8 macs[12]; /* in: mark; out: source and destination MAC */
};
_Static_assert(sizeof(struct bpf_fib_lookup) == 64, "struct bpf_fib_lookup is 64 bytes");

/* UAPI: bpf_fib_lookup() results. */
enum {
	BPF_FIB_LKUP_RET_SUCCESS = 0,
	BPF_FIB_LKUP_RET_BLACKHOLE = 1,
	BPF_FIB_LKUP_RET_UNREACHABLE = 2,
	BPF_FIB_LKUP_RET_PROHIBIT = 3,
	BPF_FIB_LKUP_RET_NOT_FWDED = 4,
	BPF_FIB_LKUP_RET_FWD_DISABLED = 5,
	BPF_FIB_LKUP_RET_UNSUPP_LWT = 6,
	BPF_FIB_LKUP_RET_NO_NEIGH = 7,
	BPF_FIB_LKUP_RET_FRAG_NEEDED = 8,
	BPF_FIB_LKUP_RET_NO_SRC_ADDR = 9,
};

/* UAPI: helper function numbers (enum bpf_func_id). */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)39;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen,
			      __u32 flags) = (void *)69;
static __u64 (*bpf_jiffies64)(void) = (void *)118;
static __u64 (*bpf_ktime_get_coarse_ns)(void) = (void *)160;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static __u64 (*bpf_xdp_get_buff_len)(struct xdp_md *ctx) = (void *)188;

/* BTF-defined maps, as libbpf and cilium/ebpf understand them. */
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define SEC(name) __attribute__((section(name), used))

#define __always_inline inline __attribute__((always_inline))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* Makes clang keep var in one register: a packet pointer computed once and
 * bounds-checked must be the one dereferenced, or the verifier, which tracks
 * each computation separately, rejects the access. */
#define barrier_var(var) asm volatile("" : "+r"(var))

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

#define bpf_ntohs(x) __builtin_bswap16(x)
#define bpf_htons(x) __builtin_bswap16(x)
#define bpf_ntohl(x) __builtin_bswap32(x)
