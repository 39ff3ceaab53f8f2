//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * aegis.c: the default-drop XDP filter on the public interface of an Aegis
 * gateway.
 *
 * Every frame gets exactly one verdict and one reason, counted in `stats`:
 *
 *   1. Parse Ethernet, up to two 802.1Q/802.1ad tags, IPv4 (honouring IHL)
 *      or IPv6 (skipping up to IPV6_MAX_EXT extension headers), TCP or UDP.
 *   2. Bypass ARP, IPv6 neighbour discovery, TCP to the controller's login
 *      port and TCP from the controller to the agent's gRPC port.
 *   3. Look up (src, dst, dport, proto) in sessions_v4/sessions_v6. A live
 *      session passes and gets its last_seen refreshed; then the static allow
 *      rules (allow_v4/allow_v6) are consulted; everything else drops.
 *
 * Sessions are checked before the allow rules. Both verdicts pass, so the
 * order only decides which counter a packet lands in; session-first keeps
 * an established session's hot path to one hash lookup and keeps last_seen
 * accurate for sessions that an allow rule also covers.
 *
 * Clock: every timestamp in the maps is CLOCK_MONOTONIC_COARSE in
 * nanoseconds: bpf_ktime_get_coarse_ns() here, clock_gettime(
 * CLOCK_MONOTONIC_COARSE) in user space (internal/state.Now). Both read the
 * same timekeeper value, so kernel and user-space stamps compare directly.
 * The coarse clock is a memory read; the precise clocks read the clocksource,
 * which on a virtual machine costs more than the whole rest of a session hit.
 * Its resolution is one scheduler tick (1-10 ms), far below the refresh
 * granularity below. Like CLOCK_MONOTONIC it does not advance while the
 * machine is suspended and never jumps with NTP or settimeofday.
 *
 * The Go reference model of this verdict is model.go; model_test.go checks
 * the two against each other packet by packet.
 */

#include "bpf_defs.h"
#include "proto.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * last_seen is rewritten only when it is older than this. One write per
 * session per granularity instead of one per packet keeps the value's cache
 * line from bouncing between CPUs that carry the same session. The cost is
 * precision: a session can expire up to this much before its idle timeout
 * measured from its very last packet. The control plane refuses idle
 * timeouts below one second, so that is at most 10%.
 */
#ifndef AEGIS_REFRESH_NS
#define AEGIS_REFRESH_NS 100000000ULL /* 100 ms */
#endif

/*
 * Bump AEGIS_LAYOUT_VERSION whenever the key or value layout of any map
 * changes. The loader refuses (and later versions migrate) pinned maps of
 * another layout version; the daemons refuse to open them.
 */
#define AEGIS_LAYOUT_VERSION 1

/* Extension headers skipped before giving up on an IPv6 packet. */
#define IPV6_MAX_EXT 6

/* Port rules one allow-list prefix can carry (see struct allow_value). */
#define ALLOW_MAX_PORTS 16

/* Slots in the stats map: room for reasons added by later versions without
 * changing the map's layout. */
#define STATS_SLOTS 32

/*
 * Verdict reasons, the index into `stats`. Reasons below
 * REASON_NO_SESSION pass, the others drop (or pass as REASON_MONITOR in
 * monitor mode). Values are part of the pinned-state contract: append only.
 */
enum reason {
	REASON_SESSION = 0,
	REASON_CONTROLLER = 1,
	REASON_ALLOWLIST = 2,
	REASON_ARP = 3,
	REASON_NDP = 4,
	REASON_MONITOR = 5,
	REASON_NO_SESSION = 6,
	REASON_EXPIRED = 7,
	REASON_MALFORMED = 8,
	REASON_FRAGMENT = 9,
	REASON_UNSUPPORTED_L3 = 10,
	REASON_UNSUPPORTED_L4 = 11,
};

/* Emits the enum into BTF so that bpf2go generates the Go constants. The
 * section is neither code nor a map, so loaders ignore it. */
const enum reason reason_btf SEC(".btf.anchor") __attribute__((unused));

enum layout {
	LAYOUT_VERSION = AEGIS_LAYOUT_VERSION,
};
const enum layout layout_btf SEC(".btf.anchor") __attribute__((unused));

/* Addresses are byte arrays and ports host-order integers so that
 * `bpftool map dump` prints them the way a person reads them. */
struct session_key_v4 {
	__u8 src[4];
	__u8 dst[4];
	__u16 dport;
	__u8 proto;
	__u8 pad;
};

struct session_key_v6 {
	__u8 src[16];
	__u8 dst[16];
	__u16 dport;
	__u8 proto;
	__u8 pad;
};

struct session_value {
	__u64 last_seen_ns;    /* CLOCK_BOOTTIME; refreshed by this program */
	__u64 created_ns;      /* CLOCK_BOOTTIME of the grant */
	__u64 expires_ns;      /* hard end of the session; 0: no lifetime cap */
	__u64 idle_timeout_ns; /* 0: config.default_idle_timeout_ns */
	char user[32];         /* NUL-padded */
};

/* Longest-prefix-match key: the source prefix of a static allow rule. */
struct allow_key_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct allow_key_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* One (protocol, destination port) pair; 0 in either field matches any. */
struct allow_port {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

/*
 * The rules that apply to one source prefix. An LPM lookup returns only the
 * longest matching prefix, so the loader stores in each prefix's value the
 * rules of every shorter prefix that covers it as well: one lookup then
 * answers for all rules.
 */
struct allow_value {
	__u32 count;
	struct allow_port ports[ALLOW_MAX_PORTS];
};

struct config_value {
	__u32 layout_version;   /* AEGIS_LAYOUT_VERSION of the pinned maps; stays first */
	__u32 pad0;
	__u64 default_idle_timeout_ns;
	__u8 controller_v4[4];  /* valid when controller_family == 4 */
	__u8 controller_v6[16]; /* valid when controller_family == 6 */
	__u16 controller_port;  /* login port, TCP */
	__u16 grpc_port;        /* agent gRPC port the controller dials, TCP */
	__u8 controller_family; /* 4, 6, or 0 for no controller bypass */
	__u8 monitor;           /* 1: count would-be drops, pass them */
	__u16 allow_v4_rules;   /* prefixes in allow_v4; 0 skips the lookup */
	__u16 allow_v6_rules;   /* prefixes in allow_v6 */
	__u16 pad1;
};

struct stats_value {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct session_key_v4);
	__type(value, struct session_value);
} sessions_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct session_key_v6);
	__type(value, struct session_value);
} sessions_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct allow_key_v4);
	__type(value, struct allow_value);
} allow_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct allow_key_v6);
	__type(value, struct allow_value);
} allow_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config_value);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STATS_SLOTS);
	__type(key, __u32);
	__type(value, struct stats_value);
} stats SEC(".maps");

/*
 * The interfaces aegis-loader was told to filter (-i), so that "every
 * configured interface is filtered whenever it exists" can be checked and
 * restored by processes that were not given the flags. Written by the
 * loader and aegis-loader watch, read by everyone; this program does not
 * use it.
 */
enum attach_mode {
	ATTACH_MODE_AUTO = 0,
	ATTACH_MODE_NATIVE = 1,
	ATTACH_MODE_GENERIC = 2,
};

struct iface_key {
	char name[16]; /* interface name, NUL-padded (IFNAMSIZ) */
};

struct iface_value {
	__u32 ifindex;           /* device the pinned link was attached to */
	__u32 prog_id;           /* program that link runs; follows upgrades */
	enum attach_mode mode;   /* as asked with --mode */
	__u32 operator_detached; /* 1: "unload -i"; left alone until the next load */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct iface_key);
	__type(value, struct iface_value);
} ifaces SEC(".maps");

/* The L4 facts the policy needs, after parsing. */
struct flow {
	__u16 dport; /* host order */
	__u8 proto;
};

static __always_inline int ports_match(const struct allow_value *v, const struct flow *f)
{
	for (__u32 i = 0; i < ALLOW_MAX_PORTS; i++) {
		if (i >= v->count)
			break;
		const struct allow_port *p = &v->ports[i];
		if ((p->proto == 0 || p->proto == f->proto) && (p->port == 0 || p->port == f->dport))
			return 1;
	}
	return 0;
}

/* Returns REASON_SESSION for a live session, REASON_EXPIRED otherwise. */
static __always_inline int session_verdict(struct session_value *v, const struct config_value *cfg)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 expires = v->expires_ns;

	if (expires && now >= expires)
		return REASON_EXPIRED;

	__u64 idle = v->idle_timeout_ns;
	if (!idle)
		idle = cfg->default_idle_timeout_ns;

	/* Signed: user space may stamp last_seen a hair after this CPU read
	 * the clock; that is a fresh session, not one idle for 584 years. */
	__s64 age = (__s64)(now - READ_ONCE(v->last_seen_ns));
	if (age > (__s64)idle)
		return REASON_EXPIRED;
	if (age > (__s64)AEGIS_REFRESH_NS)
		WRITE_ONCE(v->last_seen_ns, now);
	return REASON_SESSION;
}

/*
 * Reads the L4 ports of a TCP or UDP header at l4off, which must lie within
 * the IP datagram ending at l3end. Returns 0 on success or a drop reason.
 */
static __always_inline int parse_l4(void *data, void *data_end, __u64 l4off, __u64 l3end,
				    struct flow *f)
{
	__u64 hlen;

	if (f->proto == IPPROTO_TCP)
		hlen = sizeof(struct tcphdr);
	else if (f->proto == IPPROTO_UDP)
		hlen = sizeof(struct udphdr);
	else
		return REASON_UNSUPPORTED_L4;

	/* Both headers start with source and destination port. */
	struct udphdr *l4 = data + l4off;
	if ((void *)l4 + hlen > data_end || l4off + hlen > l3end)
		return REASON_MALFORMED;
	f->dport = bpf_ntohs(l4->dest);
	return 0;
}

static __always_inline int classify_v4(void *data, void *data_end, __u64 len, __u64 l3off,
				       const struct config_value *cfg)
{
	struct iphdr *ip = data + l3off;
	struct flow f = {};

	if ((void *)(ip + 1) > data_end)
		return REASON_MALFORMED;
	if ((ip->ver_ihl >> 4) != 4)
		return REASON_MALFORMED;

	__u64 ihl = (ip->ver_ihl & 0xF) * 4;
	__u64 tot = bpf_ntohs(ip->tot_len);
	if (ihl < sizeof(*ip) || tot < ihl || l3off + tot > len)
		return REASON_MALFORMED;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return REASON_FRAGMENT;

	f.proto = ip->protocol;
	int r = parse_l4(data, data_end, l3off + ihl, l3off + tot, &f);
	if (r)
		return r;

	if (cfg->controller_family == 4 && f.proto == IPPROTO_TCP) {
		__u32 ctl = *(__u32 *)cfg->controller_v4;
		if (ip->daddr == ctl && f.dport == cfg->controller_port)
			return REASON_CONTROLLER;
		if (ip->saddr == ctl && f.dport == cfg->grpc_port)
			return REASON_CONTROLLER;
	}

	struct session_key_v4 key = {};
	__builtin_memcpy(key.src, &ip->saddr, 4);
	__builtin_memcpy(key.dst, &ip->daddr, 4);
	key.dport = f.dport;
	key.proto = f.proto;

	r = REASON_NO_SESSION;
	struct session_value *v = bpf_map_lookup_elem(&sessions_v4, &key);
	if (v) {
		r = session_verdict(v, cfg);
		if (r == REASON_SESSION)
			return r;
	}

	if (cfg->allow_v4_rules) {
		struct allow_key_v4 ak = {.prefixlen = 32};
		__builtin_memcpy(ak.addr, &ip->saddr, 4);
		struct allow_value *av = bpf_map_lookup_elem(&allow_v4, &ak);
		if (av && ports_match(av, &f))
			return REASON_ALLOWLIST;
	}
	return r;
}

static __always_inline int addr6_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

static __always_inline int classify_v6(void *data, void *data_end, __u64 len, __u64 l3off,
				       const struct config_value *cfg)
{
	struct ipv6hdr *ip6 = data + l3off;
	struct flow f = {};

	if ((void *)(ip6 + 1) > data_end)
		return REASON_MALFORMED;
	if ((*(__u8 *)ip6 >> 4) != 6)
		return REASON_MALFORMED;

	__u64 l3end = l3off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (l3end > len)
		return REASON_MALFORMED;

	__u64 off = l3off + sizeof(*ip6);
	__u8 nh = ip6->nexthdr;

	/* Walk the extension header chain to the upper-layer header. Every
	 * extension header is at least 8 bytes; the fragment header is exactly
	 * that, and the first two bytes of the others are (next, length). */
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT; i++) {
		if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
		    nh != IPPROTO_AH && nh != IPPROTO_FRAGMENT)
			break;

		struct ipv6_fraghdr *h = data + off;
		if ((void *)(h + 1) > data_end)
			return REASON_MALFORMED;

		__u64 len;
		if (nh == IPPROTO_FRAGMENT) {
			if (h->frag_off & bpf_htons(IP6_OFFSET))
				return REASON_FRAGMENT;
			len = sizeof(*h);
		} else if (nh == IPPROTO_AH) {
			len = ((__u64)((struct ipv6_opthdr *)h)->hdrlen + 2) * 4;
		} else {
			len = ((__u64)((struct ipv6_opthdr *)h)->hdrlen + 1) * 8;
		}
		nh = h->nexthdr;
		off += len;
	}

	if (nh == IPPROTO_ICMPV6) {
		struct icmp6hdr *ic = data + off;
		if ((void *)(ic + 1) > data_end || off + sizeof(*ic) > l3end)
			return REASON_MALFORMED;
		if (ic->type >= NDISC_ROUTER_SOLICITATION && ic->type <= NDISC_REDIRECT)
			return REASON_NDP;
		return REASON_UNSUPPORTED_L4;
	}

	/* Still on an extension header after IPV6_MAX_EXT of them: give up.
	 * parse_l4 counts it as unsupported. */
	f.proto = nh;
	int r = parse_l4(data, data_end, off, l3end, &f);
	if (r)
		return r;

	if (cfg->controller_family == 6 && f.proto == IPPROTO_TCP) {
		if (f.dport == cfg->controller_port && addr6_eq(ip6->daddr, cfg->controller_v6))
			return REASON_CONTROLLER;
		if (f.dport == cfg->grpc_port && addr6_eq(ip6->saddr, cfg->controller_v6))
			return REASON_CONTROLLER;
	}

	struct session_key_v6 key = {};
	__builtin_memcpy(key.src, ip6->saddr, 16);
	__builtin_memcpy(key.dst, ip6->daddr, 16);
	key.dport = f.dport;
	key.proto = f.proto;

	r = REASON_NO_SESSION;
	struct session_value *v = bpf_map_lookup_elem(&sessions_v6, &key);
	if (v) {
		r = session_verdict(v, cfg);
		if (r == REASON_SESSION)
			return r;
	}

	if (cfg->allow_v6_rules) {
		struct allow_key_v6 ak = {.prefixlen = 128};
		__builtin_memcpy(ak.addr, ip6->saddr, 16);
		struct allow_value *av = bpf_map_lookup_elem(&allow_v6, &ak);
		if (av && ports_match(av, &f))
			return REASON_ALLOWLIST;
	}
	return r;
}

static __always_inline int classify(void *data, void *data_end, __u64 len,
				    const struct config_value *cfg)
{
	struct ethhdr *eth = data;
	__u64 off = sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return REASON_MALFORMED;

	__be16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlanhdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return REASON_MALFORMED;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}

	if (proto == bpf_htons(ETH_P_IP))
		return classify_v4(data, data_end, len, off, cfg);
	if (proto == bpf_htons(ETH_P_IPV6))
		return classify_v6(data, data_end, len, off, cfg);
	if (proto == bpf_htons(ETH_P_ARP))
		return REASON_ARP;
	/* Includes a third VLAN tag. */
	return REASON_UNSUPPORTED_L3;
}

/*
 * xdp.frags: the program accepts multi-buffer frames, so it attaches in
 * native mode to interfaces whose MTU exceeds a page (jumbo frames). The
 * headers it reads are always in the first buffer (data..data_end); the
 * IP length checks compare with the whole frame (len).
 */
SEC("xdp.frags")
int aegis_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	const struct config_value *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_DROP; /* unreachable: an array always has slot 0 */

	__u64 len = bpf_xdp_get_buff_len(ctx);
	__u32 reason = classify(data, data_end, len, cfg);
	__u32 action = reason < REASON_NO_SESSION ? XDP_PASS : XDP_DROP;
	if (action == XDP_DROP && cfg->monitor) {
		reason = REASON_MONITOR;
		action = XDP_PASS;
	}

	struct stats_value *s = bpf_map_lookup_elem(&stats, &reason);
	if (s) {
		s->packets++;
		s->bytes += len;
	}
	return action;
}
