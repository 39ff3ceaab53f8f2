//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * aegis.c: the default-drop filter on the public interface of an Aegis
 * gateway. Two programs share the maps:
 *
 *   aegis_xdp (XDP, ingress) gives every frame exactly one verdict and one
 *   reason, counted in `stats`:
 *
 *   1. Parse Ethernet, up to two 802.1Q/802.1ad tags, IPv4 (honouring IHL)
 *      or IPv6 (skipping up to IPV6_MAX_EXT extension headers), then TCP,
 *      UDP or ICMP/ICMPv6 (for an ICMP error also the header it quotes).
 *      The common frame (untagged, no IPv4 options, no IPv6 extension
 *      headers, not a fragment, TCP or UDP) has a parser of its own,
 *      parse_fast(); it reaches the same tuple, and the same policy()
 *      decides, in the order below. In front of it, express() applies
 *      rules 2 (the controller's) and 4 (the exact-protocol session) to
 *      such a frame and passes a live session's at once.
 *   2. Bypass, each as narrow as its purpose:
 *      - ARP;
 *      - IPv6 neighbour discovery (ICMPv6 133-137) with code 0 and hop
 *        limit 255, to a link-local (fe80::/10), link-scope multicast
 *        (ff02::/16) or local destination;
 *      - TCP to the controller's address and login port (the controller
 *        is behind the gateway: letting users reach it is the purpose);
 *      - TCP from the controller's address to the agent's gRPC port, when
 *        the destination is local.
 *      "Local" is the kernel's routing table's answer; see
 *      delivered_locally_v4().
 *   3. A later fragment passes, under its first fragment's reason, if that
 *      first fragment passed within FRAG_TIMEOUT_NS (`frags`).
 *   4. TCP and UDP: a live session for (src, dst, dport, proto) in
 *      sessions_v4/sessions_v6, or for (src, dst, dport, 0): an
 *      any-protocol session, looked up only when the exact one is not live.
 *   5. ICMP errors whose quoted header belongs to a live session or flow
 *      pass as icmp_related.
 *   6. TCP, UDP and ICMP echo replies that match a live flow in
 *      flows_v4/flows_v6 pass as reply.
 *   7. The static allow rules (allow_v4/allow_v6); everything else drops.
 *
 *   aegis_egress (tcx, egress of the same interface) records the flows the
 *   gateway and the hosts behind it open outbound; it never drops.
 *
 *   aegis_locality, attached nowhere and using no map, lets user space ask
 *   delivered_locally() (see the end of this file).
 *
 * The order only decides which counter a packet lands in where two rules
 * admit it; session-first keeps an established session's hot path to one
 * hash lookup and keeps last_seen accurate for sessions that an allow rule
 * also covers.
 *
 * Flows, and why they stay narrow
 * -------------------------------
 * A flow is keyed by the exact 5-tuple of the reply as this program sees
 * it: (peer, local, peer port, local port, proto). It admits nothing but
 * that peer address and port talking back to the local address and port
 * that talked to it. Only aegis_egress creates flows, and only for packets
 * leaving the gateway:
 *
 *  - TCP: an outbound SYN without ACK creates one; every outbound packet
 *    of a live flow refreshes it. A SYN-ACK (a local listener answering)
 *    never creates one, so a session's or an allow rule's TCP traffic can
 *    never turn into a flow.
 *  - UDP: any outbound datagram creates or refreshes one.
 *  - ICMP: an outbound echo request creates one that admits the echo reply
 *    (the identifier stands in for the port).
 *  - No flow is created for an outbound packet whose reply is already
 *    admitted by a session entry (live or expired, exact or any-protocol)
 *    or by an allow rule, nor for one whose reply was a session's until
 *    it was removed (a live tombstone, see "Tombstones"). A service
 *    answering a user therefore leaves no trace in the flow table, and
 *    revoking or expiring the session stops the user at once, even while
 *    the service keeps sending. Allow rules get the same treatment
 *    so that removing one also takes effect at once.
 *  - This program never creates flows; it refreshes a live one in place
 *    with the sessions' refresh granularity.
 *
 * What remains, stated so that operators can judge it:
 *
 *  - A service that falls silent towards a removed session's user for
 *    longer than the flow idle timeout loses the tombstone; if it then
 *    sends to that user again, it opens a flow as any host behind the
 *    gateway may. A flow that the private side opened to the user
 *    before the session was granted is an ordinary outbound flow and
 *    outlives the session while it is used. Turn reply tracking off
 *    (config.track_flows = 0) where either matters.
 *  - A spoofer on the public side must guess a live 5-tuple: the peer's
 *    address and port (often public knowledge, e.g. a DNS resolver's :53)
 *    and the local ephemeral port (about 28,000 possibilities per peer on
 *    Linux). A hit reaches only the local host and port that opened the
 *    flow, exactly as the real peer could; it opens nothing new, since the
 *    XDP side never creates or extends state beyond last_seen. Off-path
 *    injection into TCP still has to pass the host's own sequence checks.
 *  - A TCP flow is not closed by FIN or RST; it lingers until its idle
 *    timeout or LRU eviction, admitting only the same 5-tuple.
 *  - The flow maps are LRU: a host behind the gateway that opens more
 *    flows than they hold evicts the oldest, whose replies then drop.
 *    Nothing on the public side can add entries.
 *
 * ICMP errors (v4: 3, 11, 12; v6: 1-4) pass only when the header they quote
 * is a packet this side sent: the reverse of a live session (service to
 * user) or of a live flow, and the error is addressed to that packet's
 * source. Everything else about ICMP needs an allow rule (echo requests,
 * to answer pings) or a flow (echo replies to the gateway's own pings).
 *
 * Fragments: only the first fragment carries the L4 header. When it passes,
 * its datagram's (src, dst, IP id, proto) is remembered for FRAG_TIMEOUT_NS
 * and the later fragments pass under the same reason. A later fragment that
 * arrives before its first fragment (reordering) drops as `fragment`; the
 * datagram is lost and the sender's transport retransmits.
 *
 * Clock: every timestamp in the maps is CLOCK_MONOTONIC_COARSE in
 * nanoseconds: bpf_ktime_get_coarse_ns() here (clock_now()), clock_gettime(
 * CLOCK_MONOTONIC_COARSE) in user space (internal/state.Now). Both read the
 * same timekeeper value, so kernel and user-space stamps compare directly.
 * The coarse clock is a memory read; the precise clocks read the clocksource,
 * which on a virtual machine costs more than the whole rest of a session hit.
 * Its resolution is one scheduler tick (1-10 ms), far below the refresh
 * granularity below. Like CLOCK_MONOTONIC it does not advance while the
 * machine is suspended and never jumps with NTP or settimeofday.
 *
 * The Go reference model of both programs is model.go; model_test.go checks
 * the two against each other packet by packet.
 */

#include "bpf_defs.h"
#include "proto.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * The clock every verdict reads (see "Clock" above). The coarse clock
 * changes only at a scheduler tick, when jiffies do, but reading it is a
 * helper call, which costs more on some machines (return thunks) than a
 * session lookup. So the value is kept with the jiffies it was read at, in
 * the object's .bss, and read again only when jiffies moved:
 * bpf_jiffies64() the verifier turns into a plain load. A stamp may lag
 * the coarse clock by one tick at most (a read between the tick's jiffies
 * update and its timekeeper update keeps the older value for that tick),
 * and never leads it, so `now - last_seen` stays the age or less; a tick
 * (1-10 ms) is far below the refresh granularity and every timeout.
 * Written as ns, then jiffies: a reader that sees the new jiffies sees
 * that tick's value (or, on a weakly ordered CPU, the previous one). CPUs
 * racing at a tick write values of the same tick. One cache line, written
 * once a tick.
 */
struct clock_cache {
	__u64 ns;
	__u64 jiffies;
};
struct clock_cache clock_cache;

static __always_inline __u64 clock_now(void)
{
	__u64 j = bpf_jiffies64();
	if (READ_ONCE(clock_cache.jiffies) == j && j)
		return READ_ONCE(clock_cache.ns);
	__u64 ns = bpf_ktime_get_coarse_ns();
	WRITE_ONCE(clock_cache.ns, ns);
	WRITE_ONCE(clock_cache.jiffies, j);
	return ns;
}

/*
 * last_seen is rewritten only when it is older than this. One write per
 * session per granularity instead of one per packet keeps the value's cache
 * line from bouncing between CPUs that carry the same session. The cost is
 * precision: a session can expire up to this much before its idle timeout
 * measured from its very last packet. The control plane refuses idle
 * timeouts below one second, so that is at most 10%. Flows use the same
 * granularity.
 */
#ifndef AEGIS_REFRESH_NS
#define AEGIS_REFRESH_NS 100000000ULL /* 100 ms */
#endif

/*
 * Bump AEGIS_LAYOUT_VERSION whenever the key or value layout of any map
 * changes. The loader refuses (and later versions migrate) pinned maps of
 * another layout version; the daemons refuse to open them.
 *
 * 2: config_value grew track_flows and the flow idle timeouts; new maps
 *    flows_v4, flows_v6, frags. Later, still 2: event_drop_rate and
 *    event_pass_rate took config_value's first padding (0 in older maps:
 *    no events); new maps events, event_limit. A new map changes no
 *    existing layout: the loader creates what is missing. Later, still 2:
 *    allow_port's padding byte holds the rule id (0 in older maps: counted
 *    as unnumbered); new map allow_hits.
 */
#define AEGIS_LAYOUT_VERSION 2

/* Extension headers skipped before giving up on an IPv6 packet. */
#define IPV6_MAX_EXT 6

/* Port rules one allow-list prefix can carry (see struct allow_value). */
#define ALLOW_MAX_PORTS 16

/* Allow rules with a hit counter of their own, per address family: ids
 * 1-255 fit the one byte struct allow_port has for it; id 0 (a rule past
 * the 255th, or a slot written by a loader that numbered none) counts in
 * the family's slot 0. allow_hits holds both families' slots. */
#define ALLOW_RULE_IDS 256
#define ALLOW_HIT_SLOTS (2 * ALLOW_RULE_IDS)

/* Slots in the stats map: room for reasons added by later versions without
 * changing the map's layout. */
#define STATS_SLOTS 32

/* How long the later fragments of a datagram whose first fragment passed
 * keep passing. Fragments of one datagram leave the sender back to back;
 * two seconds cover any sane reordering without keeping entries around. */
#define FRAG_TIMEOUT_NS 2000000000ULL

/* A rate limiter bucket holds at most this much time's worth of events:
 * an idle CPU may emit one second of its rate at once. */
#define EVENT_BURST_NS 1000000000ULL

/* Verdict events (see "Verdict events" below): the ring buffer's size, a
 * power of two pages; 1 MiB holds about 14,000 events. */
#define EVENTS_RINGBUF_BYTES (1 << 20)

/*
 * Verdict reasons, the index into `stats`. Values are part of the
 * pinned-state contract: append only. Whether a reason passes is
 * PASS_REASONS below, not its position.
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
	REASON_REPLY = 12,
	REASON_ICMP_RELATED = 13,
};

/* Emits the enum into BTF so that bpf2go generates the Go constants. The
 * section is neither code nor a map, so loaders ignore it. */
const enum reason reason_btf SEC(".btf.anchor") __attribute__((unused));

/*
 * The verdict table: bit r is set when reason r passes; every other reason
 * drops (or passes as REASON_MONITOR in monitor mode). The Go model reads
 * the same constant from BTF.
 */
#define PASS(r) (1u << (r))
enum verdict {
	PASS_REASONS = PASS(REASON_SESSION) | PASS(REASON_CONTROLLER) | PASS(REASON_ALLOWLIST) |
		       PASS(REASON_ARP) | PASS(REASON_NDP) | PASS(REASON_MONITOR) |
		       PASS(REASON_REPLY) | PASS(REASON_ICMP_RELATED),
};
const enum verdict verdict_btf SEC(".btf.anchor") __attribute__((unused));

enum layout {
	LAYOUT_VERSION = AEGIS_LAYOUT_VERSION,
};
const enum layout layout_btf SEC(".btf.anchor") __attribute__((unused));

/* The compile-time limits the Go side must agree with. */
enum limits {
	LIMIT_REFRESH_NS = AEGIS_REFRESH_NS,
	LIMIT_IPV6_MAX_EXT = IPV6_MAX_EXT,
	LIMIT_ALLOW_MAX_PORTS = ALLOW_MAX_PORTS,
	LIMIT_ALLOW_RULE_IDS = ALLOW_RULE_IDS,
	LIMIT_STATS_SLOTS = STATS_SLOTS,
	LIMIT_FRAG_TIMEOUT_NS = FRAG_TIMEOUT_NS,
	LIMIT_EVENT_BURST_NS = EVENT_BURST_NS,
};
const enum limits limits_btf SEC(".btf.anchor") __attribute__((unused));

/* Addresses are byte arrays and ports host-order integers so that
 * `bpftool map dump` prints them the way a person reads them. */
struct session_key_v4 {
	__u8 src[4];
	__u8 dst[4];
	__u16 dport;
	__u8 proto; /* 6, 17, or 0: TCP and UDP */
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
	__u64 last_seen_ns;    /* see "Clock"; refreshed by this program */
	__u64 created_ns;      /* the grant's, same clock */
	__u64 expires_ns;      /* hard end of the session; 0: no lifetime cap */
	__u64 idle_timeout_ns; /* 0: config.default_idle_timeout_ns */
	char user[32];         /* NUL-padded */
};

/*
 * A flow: the reply tuple of a packet that left the gateway, as aegis_xdp
 * will see the reply. src is the remote peer, dst the local (or private)
 * host. ICMP echo: sport 0, dport the echo identifier.
 */
struct flow_key_v4 {
	__u8 src[4];
	__u8 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_key_v6 {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_value {
	__u64 last_seen_ns; /* refreshed by both programs */
	__u64 created_ns;   /* the outbound packet that created it */
};

/* A fragmented datagram whose first fragment passed. IPv4 addresses fill
 * the first 4 bytes of src and dst. */
struct frag_key {
	__u8 src[16];
	__u8 dst[16];
	__u32 id;    /* IPv4 identification or IPv6 fragment identification */
	__u8 proto;  /* IPv4 protocol, or the fragment header's next header */
	__u8 family; /* 4 or 6 */
	__u16 pad;
};

struct frag_value {
	__u64 expires_ns;
	__u32 reason; /* the first fragment's */
	__u32 pad;
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

/*
 * One (protocol, destination port) pair; 0 in either field matches any.
 * For ICMP (1) and ICMPv6 (58) the port is meaningless and 0: such a rule
 * admits every ICMP type from the prefix, as does a rule of protocol 0 and
 * port 0.
 *
 * rule is the id of the allow rule the pair comes from, its hit counter in
 * allow_hits. A prefix carries its covering prefixes' pairs, so the same
 * pair (and id) appears in every prefix the rule covers. The byte was
 * padding in older builds, which wrote it 0 and never read it.
 */
struct allow_port {
	__u8 proto;
	__u8 rule;
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
	/* Verdict events per second per CPU (see "Verdict events"); 0: none.
	 * They live in what was padding, where maps written before them hold
	 * 0, so the layout is unchanged. */
	__u16 event_drop_rate;  /* drops, and would-be drops in monitor mode */
	__u16 event_pass_rate;  /* passes */
	__u64 default_idle_timeout_ns;
	__u8 controller_v4[4];  /* valid when controller_family == 4 */
	__u8 controller_v6[16]; /* valid when controller_family == 6 */
	__u16 controller_port;  /* login port, TCP */
	__u16 grpc_port;        /* agent gRPC port the controller dials, TCP */
	__u8 controller_family; /* 4, 6, or 0 for no controller bypass */
	__u8 monitor;           /* 1: count would-be drops, pass them */
	__u16 allow_v4_rules;   /* prefixes in allow_v4; 0 skips the lookup */
	__u16 allow_v6_rules;   /* prefixes in allow_v6 */
	__u8 track_flows;       /* 1: record outbound flows and pass their replies */
	__u8 pad1;
	__u64 flow_idle_tcp_ns;  /* idle timeout of TCP flows */
	__u64 flow_idle_udp_ns;  /* of UDP flows */
	__u64 flow_idle_icmp_ns; /* of ICMP echo flows */
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

/*
 * Packets each allow rule admitted, per CPU, at (family 6 ? 256 : 0) +
 * rule id. Only aegis_xdp's allow path writes it: one per-CPU increment,
 * after the lookup it already made. The loader numbers the rules and keeps
 * an unchanged rule's id (and so its count) across loads.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ALLOW_HIT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} allow_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config_value);
} config SEC(".maps");

/*
 * What the programs read the config through. An array of one entry
 * allows direct value access: a read is one load from an address the
 * verifier fixes, where a lookup passes its key through the stack (a
 * store, then a load waiting on it) and adds a bounds check, a null check
 * and a pointer to keep in a register. A global variable is how C asks
 * for that access; Go's bpf.DirectConfig points this section's references
 * at the `config` map above before anything is loaded, so this variable
 * never becomes a map of its own and `config` stays the one the loader
 * pins and writes. Hidden: it is no variable for user space to set.
 */
__attribute__((visibility("hidden"))) struct config_value config_data SEC(".data.config");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STATS_SLOTS);
	__type(key, __u32);
	__type(value, struct stats_value);
} stats SEC(".maps");

/*
 * Verdict events
 * --------------
 * A sample of the verdicts, for operators to watch: one struct event per
 * sampled frame in the ring buffer `events`. Drops (and, in monitor mode,
 * the would-be drops) are sampled at config.event_drop_rate, passes at
 * config.event_pass_rate, in events per second per CPU; a rate of 0 emits
 * nothing of that kind and costs one comparison.
 *
 * Each CPU has a token bucket per kind in `event_limits`, so that a flood
 * costs at most its budget per packet: one per-CPU array lookup, a clock
 * read and a few additions when the bucket is empty (nothing is reserved,
 * `suppressed` counts it), plus a ring buffer reserve and submit when it is
 * not. A full ring buffer (a reader that fell behind, or none) counts the
 * event in `lost`. Per CPU because a shared bucket would put one cache line
 * under every CPU's flood.
 *
 * The bucket holds credit in event-nanoseconds: time elapsed times the
 * rate, at most the rate times EVENT_BURST_NS; an event costs one second's
 * worth (1e9). Integer arithmetic, no division, and the same figures in
 * the model.
 */
struct event {
	__u64 ts_ns;     /* bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC_COARSE */
	__u32 ifindex;   /* ingress interface */
	__u32 len;       /* bytes of the whole frame */
	__u8 src[16];    /* IPv4 in the first 4 bytes; zero unless the IP header parsed */
	__u8 dst[16];
	__u16 sport;     /* host order, once the L4 header parsed; ICMP echo request: the identifier */
	__u16 dport;     /* ICMP echo reply: the identifier */
	__u8 proto;      /* IPv4 protocol, or IPv6 upper-layer header; 0 before it is known */
	__u8 family;     /* 4 or 6; 0: not IP or the IP header did not parse */
	__u8 reason;     /* the counted reason (monitor for a would-be drop) */
	__u8 cause;      /* the verdict's own reason: what enforcement does or would do */
	__u32 action;    /* XDP_PASS or XDP_DROP, what the frame got */
	__u32 pad;
};

enum event_kind {
	EVENT_KIND_DROP = 0, /* drops and would-be drops */
	EVENT_KIND_PASS = 1,
	EVENT_KINDS,
};

struct event_limit {
	__u64 credit;     /* event-nanoseconds, see above */
	__u64 last_ns;    /* when credit was last brought up to date */
	__u64 emitted;    /* events submitted to the ring buffer */
	__u64 suppressed; /* eligible frames the bucket refused */
	__u64 lost;       /* admitted events the ring buffer had no room for */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RINGBUF_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EVENT_KINDS);
	__type(key, __u32);
	__type(value, struct event_limit);
} event_limits SEC(".maps");

const struct event event_btf SEC(".btf.anchor") __attribute__((unused));
const enum event_kind event_kind_btf SEC(".btf.anchor") __attribute__((unused));

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

/*
 * The reaper's sweep sequence: odd while a sweep deletes sessions, even
 * otherwise. Grants read it before and after they write a session to learn
 * whether a sweep may have deleted what they wrote (see
 * internal/state/sweep.go). This program does not use it; it is here so
 * that the loader creates and pins it with the other maps and bpftool
 * prints it. User space reads and writes it with BPF_F_LOCK, so that no
 * read sees half of a write.
 */
struct sweep_seq_value {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweep_seq_value);
} sweep_seq SEC(".maps");

/* LRU maps are preallocated: 65536 entries cost roughly 5 MiB (IPv4) and
 * 7 MiB (IPv6). The loader may size them differently. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key_v4);
	__type(value, struct flow_value);
} flows_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key_v6);
	__type(value, struct flow_value);
} flows_v6 SEC(".maps");

/*
 * Port marks
 * ----------
 * A lookup in a hash map costs about as much as the rest of a session hit
 * together, and a packet that passes as a reply, or drops, would make
 * three: the exact session, the any-protocol session, the flow. Most such
 * packets go to a port no session is for: a reply's destination port is
 * the gateway's (or a private host's) ephemeral port, and a scan or flood
 * picks ports at random. port_marks says which ports a lookup can find
 * anything at, one slot per (class, port): MARK_TCP, MARK_UDP and MARK_ANY
 * for sessions of protocol 6, 17 and 0 for that destination port, MARK_FLOW
 * for flows whose reply arrives at that port. A lookup is skipped only
 * when its port is unmarked and the marks of its kind are trusted.
 *
 * Marks are never cleared while the map lives: a port marked once costs
 * its lookups from then on, never a verdict. Every writer marks before the
 * entry it writes becomes visible: user space before it writes a session
 * (internal/state), this program before it creates a flow. A slot holds 0
 * or 1 and each writer writes 1, so writers need no coordination.
 *
 * Trust, one slot for each kind:
 *   MARKS_SESSIONS_TRUSTED is set by the control plane once it has marked
 *     the port of every session the maps hold; from then on it marks
 *     before each write.
 *   MARKS_FLOWS_TRUSTED is set by the loader once this build's egress
 *     program runs on every interface and it has marked the port of every
 *     flow an earlier build created.
 * The loader clears both before it swaps programs, since it cannot know
 * whether the daemons running beside the new program mark (a build from
 * before this map does not). Untrusted marks change nothing: every lookup
 * is made.
 */
enum mark_slot {
	MARK_TCP = 0,          /* + port: a TCP session for the port */
	MARK_UDP = 65536,      /* + port: a UDP session */
	MARK_ANY = 2 * 65536,  /* + port: an any-protocol session */
	MARK_FLOW = 3 * 65536, /* + port: a flow whose reply arrives at the port */
	MARKS_SESSIONS_TRUSTED = 4 * 65536,
	MARKS_FLOWS_TRUSTED,
	MARK_SLOTS,
};
const enum mark_slot mark_slot_btf SEC(".btf.anchor") __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MARK_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} port_marks SEC(".maps");

static __always_inline int mark_set(__u32 slot)
{
	__u32 *v = bpf_map_lookup_elem(&port_marks, &slot);
	return v && READ_ONCE(*v);
}

/* Whether a lookup of an entry of this mark's kind at port may find one.
 * The port's own mark first: set for every port with live sessions, so a
 * session hit reads one slot. */
static __always_inline int may_hold(__u32 kind, __u32 trusted, __u16 port)
{
	return mark_set(kind + port) || !mark_set(trusted);
}

/* Whether a session of proto for port may exist. Sessions are of TCP, UDP
 * or any protocol (0); for another protocol there is no mark to consult. */
static __always_inline int session_may_exist(__u8 proto, __u16 port)
{
	__u32 kind;
	if (proto == IPPROTO_TCP)
		kind = MARK_TCP;
	else if (proto == IPPROTO_UDP)
		kind = MARK_UDP;
	else if (proto == 0)
		kind = MARK_ANY;
	else
		return 1;
	return may_hold(kind, MARKS_SESSIONS_TRUSTED, port);
}

/* Whether a flow whose reply arrives at port may exist. */
static __always_inline int flow_may_exist(__u16 port)
{
	return may_hold(MARK_FLOW, MARKS_FLOWS_TRUSTED, port);
}

/* Marks port for the flows this program creates. */
static __always_inline void mark_flow(__u16 port)
{
	__u32 slot = MARK_FLOW + port;
	__u32 *v = bpf_map_lookup_elem(&port_marks, &slot);
	if (v && !READ_ONCE(*v))
		WRITE_ONCE(*v, 1);
}

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
} frags SEC(".maps");

/* What an L4 header is, for the policy. */
enum l4_kind {
	L4_PORTS = 0,    /* TCP or UDP */
	L4_ECHO_REQUEST, /* sport: identifier, dport 0 */
	L4_ECHO_REPLY,   /* sport 0, dport: identifier */
	L4_ICMP_ERROR,   /* quotes a header, see struct tuple's quote */
	L4_ICMP_OTHER,   /* any other ICMP type; also an unmatchable quote */
};

/*
 * A packet's identity as the policy sees it: both families in one shape so
 * that one policy serves both. IPv4 addresses fill the first 4 bytes.
 * Aligned so that the addresses compare as 32-bit words.
 */
struct tuple {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport; /* host order */
	__u16 dport;
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u8 kind;   /* enum l4_kind */
	__u8 tcp_flags;
} __attribute__((aligned(8)));

/* A parsed IP header: the tuple's addresses and protocol, and where the
 * upper-layer header is. */
struct ip_info {
	struct tuple t;
	__u64 l4off;
	__u64 l3end;
	__u32 frag_id;
	__u8 frag_proto;
	__u8 frag; /* enum frag_state */
	__u8 hop_limit;
};

enum frag_state {
	FRAG_NONE = 0,
	FRAG_FIRST,
	FRAG_LATER,
};

/* Takes one event's credit from the bucket, refilled for the time since
 * its last use at rate events per second. */
static __always_inline int event_admit(struct event_limit *l, __u64 rate, __u64 now)
{
	__s64 elapsed = (__s64)(now - l->last_ns);
	if (elapsed < 0)
		elapsed = 0;
	if (elapsed > (__s64)EVENT_BURST_NS)
		elapsed = EVENT_BURST_NS;
	__u64 max = rate * EVENT_BURST_NS;
	__u64 credit = l->credit + (__u64)elapsed * rate;
	if (credit > max)
		credit = max;
	/* A refusal leaves credit and last_ns as they were: the refill is
	 * recomputed from the same start next time, to the same figure (the
	 * clamps only bind once a full event's worth has accrued). One store
	 * per refused frame instead of three. */
	if (credit < 1000000000ULL) {
		l->suppressed++;
		return 0;
	}
	l->credit = credit - 1000000000ULL;
	l->last_ns = now;
	return 1;
}

static __always_inline void event_emit(struct xdp_md *ctx, const struct config_value *cfg,
				       const struct tuple *t, __u32 reason, __u32 cause,
				       __u32 action, __u64 len, __u64 now)
{
	__u32 kind = cause == reason && action == XDP_PASS ? EVENT_KIND_PASS : EVENT_KIND_DROP;
	__u64 rate = kind == EVENT_KIND_PASS ? cfg->event_pass_rate : cfg->event_drop_rate;
	if (!rate)
		return;
	struct event_limit *l = bpf_map_lookup_elem(&event_limits, &kind);
	if (!l)
		return;
	if (!event_admit(l, rate, now))
		return;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		l->lost++;
		return;
	}
	e->ts_ns = now;
	e->ifindex = ctx->ingress_ifindex;
	e->len = len;
	if (t->family == 4) {
		/* The fast path writes only an IPv4 address's 4 bytes. */
		__builtin_memset(e->src, 0, 16);
		__builtin_memset(e->dst, 0, 16);
		__builtin_memcpy(e->src, t->src, 4);
		__builtin_memcpy(e->dst, t->dst, 4);
	} else {
		__builtin_memcpy(e->src, t->src, 16);
		__builtin_memcpy(e->dst, t->dst, 16);
	}
	e->sport = t->sport;
	e->dport = t->dport;
	e->proto = t->proto;
	e->family = t->family;
	e->reason = reason;
	e->cause = cause;
	e->action = action;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
	l->emitted++;
}

static __always_inline int passes(__u32 reason)
{
	return (PASS_REASONS >> (reason & 31)) & 1;
}

static __always_inline int addr4_eq(const void *a, const void *b)
{
	return *(const __u32 *)a == *(const __u32 *)b;
}

static __always_inline int addr6_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

static __always_inline int addr_eq(__u8 family, const void *a, const void *b)
{
	return family == 4 ? addr4_eq(a, b) : addr6_eq(a, b);
}

static __always_inline int is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* The reply to t: addresses and ports swapped, an echo request's identifier
 * moved to where the echo reply carries it. */
static __always_inline void reverse(const struct tuple *t, struct tuple *r)
{
	__builtin_memcpy(r->src, t->dst, 16);
	__builtin_memcpy(r->dst, t->src, 16);
	r->sport = t->dport;
	r->dport = t->sport;
	r->proto = t->proto;
	r->family = t->family;
	r->kind = t->kind == L4_ECHO_REQUEST ? L4_ECHO_REPLY : t->kind;
	r->tcp_flags = 0;
}

/*
 * The two families' lookups must stay two call sites. Merged into one (the
 * compiler sinks the identical calls into their common successor), the map
 * is no longer a constant at the call, so the verifier cannot inline the
 * lookup and the program pays the generic helper's indirect call. The
 * empty asm after one of them leaves the two paths nothing in common to
 * sink.
 */
#define LOOKUP_APART(v) barrier_var(v)

/* The session key of t's source, destination and destination port with
 * proto; sessions and tombstones share it. */
static __always_inline void session_key4(const struct tuple *t, __u8 proto, struct session_key_v4 *k)
{
	__builtin_memcpy(k->src, t->src, 4);
	__builtin_memcpy(k->dst, t->dst, 4);
	k->dport = t->dport;
	k->proto = proto;
}

static __always_inline void session_key6(const struct tuple *t, __u8 proto, struct session_key_v6 *k)
{
	__builtin_memcpy(k->src, t->src, 16);
	__builtin_memcpy(k->dst, t->dst, 16);
	k->dport = t->dport;
	k->proto = proto;
}

/* The entry under t's session key with proto in map4 or map6, by family:
 * a session or a tombstone. Always inlined, so each map is a constant at
 * its call site, which the verifier's inlining of the lookup needs. */
static __always_inline void *session_keyed(void *map4, void *map6, const struct tuple *t, __u8 proto)
{
	if (t->family == 4) {
		struct session_key_v4 k = {};
		session_key4(t, proto, &k);
		void *v = bpf_map_lookup_elem(map4, &k);
		LOOKUP_APART(v);
		return v;
	}
	struct session_key_v6 k = {};
	session_key6(t, proto, &k);
	return bpf_map_lookup_elem(map6, &k);
}

static __always_inline struct session_value *session_find(const struct tuple *t, __u8 proto)
{
	return session_keyed(&sessions_v4, &sessions_v6, t, proto);
}

static __always_inline void flow_key4(const struct tuple *t, struct flow_key_v4 *k)
{
	__builtin_memcpy(k->src, t->src, 4);
	__builtin_memcpy(k->dst, t->dst, 4);
	k->sport = t->sport;
	k->dport = t->dport;
	k->proto = t->proto;
}

static __always_inline void flow_key6(const struct tuple *t, struct flow_key_v6 *k)
{
	__builtin_memcpy(k->src, t->src, 16);
	__builtin_memcpy(k->dst, t->dst, 16);
	k->sport = t->sport;
	k->dport = t->dport;
	k->proto = t->proto;
}

static __always_inline struct flow_value *flow_find(const struct tuple *t)
{
	if (t->family == 4) {
		struct flow_key_v4 k = {};
		flow_key4(t, &k);
		struct flow_value *v = bpf_map_lookup_elem(&flows_v4, &k);
		LOOKUP_APART(v);
		return v;
	}
	struct flow_key_v6 k = {};
	flow_key6(t, &k);
	return bpf_map_lookup_elem(&flows_v6, &k);
}

static __always_inline void flow_create(const struct tuple *t, __u64 now)
{
	struct flow_value v = {.last_seen_ns = now, .created_ns = now};
	mark_flow(t->dport); /* before the flow exists: see "Port marks" */
	if (t->family == 4) {
		struct flow_key_v4 k = {};
		flow_key4(t, &k);
		bpf_map_update_elem(&flows_v4, &k, &v, BPF_ANY);
		return;
	}
	struct flow_key_v6 k = {};
	flow_key6(t, &k);
	bpf_map_update_elem(&flows_v6, &k, &v, BPF_ANY);
}

/* session_find() and flow_find() for the ingress verdict, which skips what
 * the port marks rule out. */
static __always_inline struct session_value *session_lookup(const struct tuple *t, __u8 proto)
{
	return session_may_exist(proto, t->dport) ? session_find(t, proto) : 0;
}

static __always_inline struct flow_value *flow_lookup(const struct tuple *t)
{
	return flow_may_exist(t->dport) ? flow_find(t) : 0;
}

/* Whether a session passes traffic at now; refreshes last_seen if asked. */
static __always_inline int session_live(struct session_value *v, const struct config_value *cfg,
					__u64 now, int refresh)
{
	__u64 expires = v->expires_ns;

	if (expires && now >= expires)
		return 0;

	__u64 idle = v->idle_timeout_ns;
	if (!idle)
		idle = cfg->default_idle_timeout_ns;

	/* Signed: user space may stamp last_seen a hair after this CPU read
	 * the clock; that is a fresh session, not one idle for 584 years. */
	__s64 age = (__s64)(now - READ_ONCE(v->last_seen_ns));
	if (age > (__s64)idle)
		return 0;
	if (refresh && age > (__s64)AEGIS_REFRESH_NS)
		WRITE_ONCE(v->last_seen_ns, now);
	return 1;
}

static __always_inline __u64 flow_idle(__u8 proto, const struct config_value *cfg)
{
	if (proto == IPPROTO_TCP)
		return cfg->flow_idle_tcp_ns;
	if (proto == IPPROTO_UDP)
		return cfg->flow_idle_udp_ns;
	return cfg->flow_idle_icmp_ns;
}

/* Whether an entry last seen at *last_seen is live at now, idle for at
 * most idle; refreshes *last_seen if asked. Flows and tombstones age so. */
static __always_inline int seen_live(__u64 *last_seen, __u64 idle, __u64 now, int refresh)
{
	__s64 age = (__s64)(now - READ_ONCE(*last_seen));
	if (age > (__s64)idle)
		return 0;
	if (refresh && age > (__s64)AEGIS_REFRESH_NS)
		WRITE_ONCE(*last_seen, now);
	return 1;
}

/* Whether a flow is live at now; refreshes last_seen if asked. */
static __always_inline int flow_live(struct flow_value *v, __u8 proto,
				     const struct config_value *cfg, __u64 now, int refresh)
{
	return seen_live(&v->last_seen_ns, flow_idle(proto, cfg), now, refresh);
}

/* The first of v's pairs that admits (proto, port), in stored order. */
static __always_inline const struct allow_port *ports_match(const struct allow_value *v, __u8 proto,
							    __u16 port)
{
	for (__u32 i = 0; i < ALLOW_MAX_PORTS; i++) {
		if (i >= v->count)
			break;
		const struct allow_port *p = &v->ports[i];
		if ((p->proto == 0 || p->proto == proto) && (p->port == 0 || p->port == port))
			return p;
	}
	return 0;
}

/* The allow rule's pair that admits t, or NULL. ICMP has no port: only
 * rules of port 0 match it. */
static __always_inline const struct allow_port *allow_match(const struct tuple *t,
							    const struct config_value *cfg)
{
	__u16 port = is_icmp(t->proto) ? 0 : t->dport;
	const struct allow_value *av;

	if (t->family == 4) {
		if (!cfg->allow_v4_rules)
			return 0;
		struct allow_key_v4 ak = {.prefixlen = 32};
		__builtin_memcpy(ak.addr, t->src, 4);
		av = bpf_map_lookup_elem(&allow_v4, &ak);
	} else {
		if (!cfg->allow_v6_rules)
			return 0;
		struct allow_key_v6 ak = {.prefixlen = 128};
		__builtin_memcpy(ak.addr, t->src, 16);
		av = bpf_map_lookup_elem(&allow_v6, &ak);
	}
	return av ? ports_match(av, t->proto, port) : 0;
}

static __always_inline int allowed(const struct tuple *t, const struct config_value *cfg)
{
	return allow_match(t, cfg) != 0;
}

/* Counts a packet an allow rule admitted against the rule. */
static __always_inline void allow_hit(__u8 family, const struct allow_port *p)
{
	__u32 slot = (family == 6 ? ALLOW_RULE_IDS : 0) + p->rule;
	__u64 *n = bpf_map_lookup_elem(&allow_hits, &slot);
	if (n)
		(*n)++;
}

/*
 * Whether the stack delivers a packet for daddr to the gateway itself
 * rather than forwarding it: the test that keeps the bypasses from opening
 * a path to the hosts behind the gateway to anyone who can write the
 * controller's address (or anything) into a source field.
 *
 * The answer is the kernel's own, from bpf_fib_lookup(), so it follows
 * address and route changes with no configuration: a list of the gateway's
 * addresses in the config map would have to be rewritten by the loader on
 * every change (DHCP, SLAAC, an added interface) and would change the
 * map's layout. The lookup is the one
 * the stack's input path makes: an input lookup from the ingress interface
 * (not BPF_FIB_LOOKUP_OUTPUT), through the policy rules (not
 * BPF_FIB_LOOKUP_DIRECT), tot_len 0 so no MTU check. The source is left
 * unspecified so that the answer depends on the destination alone: an
 * IPv6 lookup answers NOT_FWDED for any destination when the source is
 * link-local, and the source is the sender's to choose. (With the kernel's
 * default rule set the local table is consulted first, whatever the
 * source.)
 *
 * Only BPF_FIB_LKUP_RET_NOT_FWDED counts as local. It means the route is
 * not a unicast route: one of the gateway's addresses (RTN_LOCAL), a
 * broadcast or anycast address, an IPv6 link-local destination (which the
 * kernel never forwards off the link it came from), or no route at all.
 * Passing the no-route case opens nothing: the stack finds no route either
 * and drops the packet. The other results:
 *   SUCCESS, NO_NEIGH, FRAG_NEEDED, UNSUPP_LWT: the stack would forward it.
 *   BLACKHOLE, UNREACHABLE, PROHIBIT: the stack would drop it too.
 *   FWD_DISABLED: returned before any lookup, when forwarding is off; it
 *     says nothing about the destination. For IPv6 the flag it reads (on
 *     recent kernels the ingress interface's) is not the one the stack's
 *     forwarding obeys (net.ipv6.conf.all.forwarding), so it cannot be
 *     read as "will not be forwarded" either. A gateway forwards on its
 *     public interface; elsewhere these bypasses fail closed.
 *   negative (no such interface): not local.
 *
 * Multicast destinations are never local here. The IPv4 stack routes them
 * apart from the FIB (so its "no route" says nothing), the IPv6 lookup
 * answers NOT_FWDED for all of them, and with multicast routing on either
 * may be forwarded. No TCP connection goes to a multicast address, and
 * neighbour discovery's multicast destinations are checked on their own.
 *
 * The lookup runs only for bypass candidates, never for session traffic.
 */
static __always_inline int delivered_locally_v4(struct xdp_md *ctx, __be32 daddr)
{
	if ((((const __u8 *)&daddr)[0] & 0xF0) == 0xE0)
		return 0;

	struct bpf_fib_lookup p = {
		.family = AF_INET,
		.ifindex = ctx->ingress_ifindex,
		.ipv4_dst = daddr,
	};
	return bpf_fib_lookup(ctx, &p, sizeof(p), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

static __always_inline int delivered_locally_v6(struct xdp_md *ctx, const __u8 *daddr)
{
	if (daddr[0] == 0xFF)
		return 0;

	struct bpf_fib_lookup p = {
		.family = AF_INET6,
		.ifindex = ctx->ingress_ifindex,
	};
	__builtin_memcpy(p.ipv6_dst, daddr, 16);
	return bpf_fib_lookup(ctx, &p, sizeof(p), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

static __always_inline int delivered_locally(struct xdp_md *ctx, const struct tuple *t)
{
	if (t->family == 4)
		return delivered_locally_v4(ctx, *(const __be32 *)t->dst);
	return delivered_locally_v6(ctx, t->dst);
}

static __always_inline int controller_bypass(struct xdp_md *ctx, const struct tuple *t,
					     const struct config_value *cfg)
{
	if (t->proto != IPPROTO_TCP || cfg->controller_family != t->family)
		return 0;
	const __u8 *ctl = t->family == 4 ? cfg->controller_v4 : cfg->controller_v6;
	if (t->dport == cfg->controller_port && addr_eq(t->family, t->dst, ctl))
		return 1;
	return t->dport == cfg->grpc_port && addr_eq(t->family, t->src, ctl) &&
	       delivered_locally(ctx, t);
}

/*
 * Whether q, the header an ICMP error quotes, is a packet this side sent
 * that is still allowed: the reverse of a live session or of a live flow.
 * Neither is refreshed: an error is no sign of life.
 */
static __always_inline int related(const struct tuple *q, const struct config_value *cfg, __u64 now)
{
	struct tuple r;
	reverse(q, &r);

	if (q->kind == L4_PORTS) {
		struct session_value *v = session_lookup(&r, r.proto);
		if (v && session_live(v, cfg, now, 0))
			return 1;
		v = session_lookup(&r, 0);
		if (v && session_live(v, cfg, now, 0))
			return 1;
	} else if (q->kind != L4_ECHO_REQUEST) {
		return 0;
	}
	if (!cfg->track_flows)
		return 0;
	struct flow_value *f = flow_lookup(&r);
	return f && flow_live(f, r.proto, cfg, now, 0);
}

/* What the exact-protocol session v (or none) makes of a frame at now:
 * REASON_SESSION if live (refreshing it), REASON_EXPIRED if not,
 * REASON_NO_SESSION without one. */
static __always_inline int session_outcome(struct session_value *v, const struct config_value *cfg,
					   __u64 now)
{
	if (!v)
		return REASON_NO_SESSION;
	return session_live(v, cfg, now, 1) ? REASON_SESSION : REASON_EXPIRED;
}

/*
 * The first two rules for TCP and UDP: the controller bypass, then the
 * exact-protocol session. Returns REASON_CONTROLLER, REASON_SESSION, or
 * what the exact session leaves for the rules after it: REASON_EXPIRED if
 * it exists but is not live, REASON_NO_SESSION if it does not exist.
 */
static __always_inline int exact_rules(struct xdp_md *ctx, const struct tuple *t,
				       const struct config_value *cfg, __u64 now)
{
	if (controller_bypass(ctx, t, cfg))
		return REASON_CONTROLLER;
	return session_outcome(session_lookup(t, t->proto), cfg, now);
}

/*
 * The policy for an inbound packet that parsed completely; q is the quoted
 * header of an ICMP error. Shared by IPv4 and IPv6. exact is what
 * exact_rules() returned for t if the caller has already applied them
 * (express() does), or negative.
 */
static __always_inline int policy(struct xdp_md *ctx, const struct tuple *t,
				  const struct tuple *q, const struct config_value *cfg, __u64 now,
				  int exact)
{
	int r = REASON_NO_SESSION;

	if (t->kind == L4_PORTS) {
		if (exact < 0)
			exact = exact_rules(ctx, t, cfg, now);
		if (exact == REASON_CONTROLLER || exact == REASON_SESSION)
			return exact;
		r = exact;
		struct session_value *v = session_lookup(t, 0);
		if (v) {
			if (session_live(v, cfg, now, 1))
				return REASON_SESSION;
			r = REASON_EXPIRED;
		}
	} else if (t->kind == L4_ICMP_ERROR) {
		/* An error goes to the source of the packet it quotes. */
		if (addr_eq(t->family, t->dst, q->src) && related(q, cfg, now))
			return REASON_ICMP_RELATED;
	}

	if ((t->kind == L4_PORTS || t->kind == L4_ECHO_REPLY) && cfg->track_flows) {
		struct flow_value *f = flow_lookup(t);
		if (f && flow_live(f, t->proto, cfg, now, 1))
			return REASON_REPLY;
	}

	const struct allow_port *ap = allow_match(t, cfg);
	if (ap) {
		allow_hit(t->family, ap);
		return REASON_ALLOWLIST;
	}
	if (t->kind == L4_ICMP_OTHER)
		return REASON_UNSUPPORTED_L4;
	return r;
}

/*
 * Reads the L4 header at off, which must lie within the IP datagram ending
 * at l3end, into t. Returns 0 on success or a drop reason.
 */
static __always_inline int parse_l4(void *data, void *data_end, __u64 off, __u64 l3end,
				    struct tuple *t)
{
	void *l4 = data + off;
	barrier_var(l4);

	if (t->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || off + sizeof(*th) > l3end)
			return REASON_MALFORMED;
		t->sport = bpf_ntohs(th->source);
		t->dport = bpf_ntohs(th->dest);
		t->tcp_flags = th->flags;
		t->kind = L4_PORTS;
		return 0;
	}
	if (t->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end || off + sizeof(*uh) > l3end)
			return REASON_MALFORMED;
		t->sport = bpf_ntohs(uh->source);
		t->dport = bpf_ntohs(uh->dest);
		t->kind = L4_PORTS;
		return 0;
	}
	if (t->proto != (t->family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6))
		return REASON_UNSUPPORTED_L4;

	struct icmphdr *ic = l4;
	if ((void *)(ic + 1) > data_end || off + sizeof(*ic) > l3end)
		return REASON_MALFORMED;
	__u8 type = ic->type;
	t->kind = L4_ICMP_OTHER;
	if (t->family == 4) {
		if (type == ICMP_ECHO)
			t->kind = L4_ECHO_REQUEST;
		else if (type == ICMP_ECHOREPLY)
			t->kind = L4_ECHO_REPLY;
		else if (type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
			 type == ICMP_PARAMETERPROB)
			t->kind = L4_ICMP_ERROR;
	} else {
		if (type == ICMPV6_ECHO_REQUEST)
			t->kind = L4_ECHO_REQUEST;
		else if (type == ICMPV6_ECHO_REPLY)
			t->kind = L4_ECHO_REPLY;
		else if (type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB)
			t->kind = L4_ICMP_ERROR;
	}
	if (t->kind == L4_ECHO_REQUEST)
		t->sport = bpf_ntohs(ic->id);
	else if (t->kind == L4_ECHO_REPLY)
		t->dport = bpf_ntohs(ic->id);
	return 0;
}

/*
 * Reads the header an ICMP error quotes (RFC 792, RFC 4443: the offending
 * packet's IP header and at least 8 bytes of what follows) into q. The
 * quote must lie within the outer datagram. Returns 0, or REASON_MALFORMED
 * for a truncated quote or an inner header that is not IP of the outer
 * family. A quote this program cannot match (an inner IPv6 extension
 * header, a later fragment, a protocol without ports) gets kind
 * L4_ICMP_OTHER and matches nothing.
 */
static __always_inline int parse_quote(void *data, void *data_end, __u64 off, __u64 l3end,
				       __u8 family, struct tuple *q)
{
	__u64 l4off;
	__u8 proto;

	__builtin_memset(q, 0, sizeof(*q));
	q->family = family;
	q->kind = L4_ICMP_OTHER;
	if (family == 4) {
		struct iphdr *ip = data + off;
		if ((void *)(ip + 1) > data_end || off + sizeof(*ip) > l3end)
			return REASON_MALFORMED;
		__u64 ihl = (ip->ver_ihl & 0xF) * 4;
		if ((ip->ver_ihl >> 4) != 4 || ihl < sizeof(*ip))
			return REASON_MALFORMED;
		l4off = off + ihl;
		if (ip->frag_off & bpf_htons(IP_OFFSET))
			proto = 0xFF; /* no L4 header here: unmatchable */
		else
			proto = ip->protocol;
		__builtin_memcpy(q->src, &ip->saddr, 4);
		__builtin_memcpy(q->dst, &ip->daddr, 4);
	} else {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > data_end || off + sizeof(*ip6) > l3end)
			return REASON_MALFORMED;
		if ((*(__u8 *)ip6 >> 4) != 6)
			return REASON_MALFORMED;
		l4off = off + sizeof(*ip6);
		proto = ip6->nexthdr;
		__builtin_memcpy(q->src, ip6->saddr, 16);
		__builtin_memcpy(q->dst, ip6->daddr, 16);
	}

	struct icmphdr *l4 = data + l4off; /* 8 bytes: ports, or type and identifier */
	barrier_var(l4);
	if ((void *)(l4 + 1) > data_end || l4off + sizeof(*l4) > l3end)
		return REASON_MALFORMED;
	q->proto = proto;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)l4;
		q->sport = bpf_ntohs(uh->source);
		q->dport = bpf_ntohs(uh->dest);
		q->kind = L4_PORTS;
	} else if ((family == 4 && proto == IPPROTO_ICMP && l4->type == ICMP_ECHO) ||
		   (family == 6 && proto == IPPROTO_ICMPV6 && l4->type == ICMPV6_ECHO_REQUEST)) {
		q->sport = bpf_ntohs(l4->id);
		q->kind = L4_ECHO_REQUEST;
	}
	return 0;
}

static __always_inline void frag_key_of(const struct ip_info *p, struct frag_key *k)
{
	__builtin_memcpy(k->src, p->t.src, 16);
	__builtin_memcpy(k->dst, p->t.dst, 16);
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->family = p->t.family;
}

/* A later fragment passes under its first fragment's reason while that
 * is remembered. */
static __always_inline int frag_verdict(const struct ip_info *p, __u64 now)
{
	struct frag_key k = {};
	frag_key_of(p, &k);
	struct frag_value *v = bpf_map_lookup_elem(&frags, &k);
	if (v && (__s64)(now - v->expires_ns) < 0)
		return v->reason;
	return REASON_FRAGMENT;
}

static __always_inline void frag_remember(const struct ip_info *p, __u32 reason, __u64 now)
{
	struct frag_key k = {};
	frag_key_of(p, &k);
	struct frag_value v = {
		.expires_ns = now + FRAG_TIMEOUT_NS,
		.reason = reason,
	};
	bpf_map_update_elem(&frags, &k, &v, BPF_ANY);
}

/*
 * Parses an IPv4 header at l3off into p. len is the whole frame's length.
 * Returns 0 or a drop reason.
 */
static __always_inline int parse_v4(void *data, void *data_end, __u64 len, __u64 l3off,
				    struct ip_info *p)
{
	struct iphdr *ip = data + l3off;

	if ((void *)(ip + 1) > data_end)
		return REASON_MALFORMED;
	if ((ip->ver_ihl >> 4) != 4)
		return REASON_MALFORMED;

	__u64 ihl = (ip->ver_ihl & 0xF) * 4;
	__u64 tot = bpf_ntohs(ip->tot_len);
	if (ihl < sizeof(*ip) || tot < ihl || l3off + tot > len)
		return REASON_MALFORMED;

	p->t.family = 4;
	p->t.proto = ip->protocol;
	__builtin_memcpy(p->t.src, &ip->saddr, 4);
	__builtin_memcpy(p->t.dst, &ip->daddr, 4);
	p->l4off = l3off + ihl;
	p->l3end = l3off + tot;
	if (ip->frag_off & bpf_htons(IP_OFFSET | IP_MF)) {
		p->frag = (ip->frag_off & bpf_htons(IP_OFFSET)) ? FRAG_LATER : FRAG_FIRST;
		p->frag_id = bpf_ntohs(ip->id);
		p->frag_proto = ip->protocol;
	}
	return 0;
}

/*
 * Parses an IPv6 header and its extension headers at l3off into p, up to
 * the upper-layer header (or a later fragment's fragment header). Returns 0
 * or a drop reason.
 */
static __always_inline int parse_v6(void *data, void *data_end, __u64 len, __u64 l3off,
				    struct ip_info *p)
{
	struct ipv6hdr *ip6 = data + l3off;

	if ((void *)(ip6 + 1) > data_end)
		return REASON_MALFORMED;
	if ((*(__u8 *)ip6 >> 4) != 6)
		return REASON_MALFORMED;

	__u64 l3end = l3off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (l3end > len)
		return REASON_MALFORMED;

	p->t.family = 6;
	p->hop_limit = ip6->hop_limit;
	__builtin_memcpy(p->t.src, ip6->saddr, 16);
	__builtin_memcpy(p->t.dst, ip6->daddr, 16);
	p->l3end = l3end;

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
			if (h->frag_off & bpf_htons(IP6_OFFSET | 1)) {
				p->frag_id = bpf_ntohl(h->identification);
				p->frag_proto = h->nexthdr;
				p->frag = (h->frag_off & bpf_htons(IP6_OFFSET)) ? FRAG_LATER : FRAG_FIRST;
				if (p->frag == FRAG_LATER)
					return 0;
			}
			len = sizeof(*h);
		} else if (nh == IPPROTO_AH) {
			len = ((__u64)((struct ipv6_opthdr *)h)->hdrlen + 2) * 4;
		} else {
			len = ((__u64)((struct ipv6_opthdr *)h)->hdrlen + 1) * 8;
		}
		nh = h->nexthdr;
		off += len;
	}

	/* Still on an extension header after IPV6_MAX_EXT of them: give up.
	 * parse_l4 counts it as unsupported. */
	p->t.proto = nh;
	p->l4off = off;
	return 0;
}

/* The part of the ingress verdict shared by IPv4 and IPv6. */
static __always_inline int classify_ip(struct xdp_md *ctx, void *data, void *data_end,
				       struct ip_info *p, const struct config_value *cfg, __u64 now)
{
	if (p->frag == FRAG_LATER)
		return frag_verdict(p, now);

	int r = parse_l4(data, data_end, p->l4off, p->l3end, &p->t);
	if (r)
		return r;

	/* Read by the policy only for an ICMP error. Zeroed all the same: the
	 * common frame never comes here (parse_fast), and left undefined the
	 * compiler may read it from whatever register is at hand, which the
	 * verifier rightly refuses. */
	struct tuple q = {};
	if (p->t.kind == L4_ICMP_ERROR) {
		r = parse_quote(data, data_end, p->l4off + sizeof(struct icmphdr), p->l3end,
				p->t.family, &q);
		if (r)
			return r;
	}

	r = policy(ctx, &p->t, &q, cfg, now, -1);
	if (p->frag == FRAG_FIRST && passes(r))
		frag_remember(p, r, now);
	return r;
}

/*
 * Neighbour discovery must pass to keep the public link working, and must
 * not become a way past the filter. RFC 4861 has receivers discard these
 * messages unless the hop limit is 255 (so they cannot have been routed:
 * a router decrements it) and the code is 0. Their destinations are on
 * the link by nature: link-local addresses, the link's multicast groups
 * (all-nodes, all-routers, solicited-node: all in ff02::/16, which
 * multicast routing never forwards), or, for unicast solicitations and
 * advertisements, the gateway's own addresses. A hop limit of 255 says the
 * packet was not forwarded to the gateway; the destination check keeps the
 * gateway from forwarding it on (with 254 left) to a host behind it.
 */
static __always_inline int ndp_bypass(struct xdp_md *ctx, const struct ip_info *p,
				      const struct icmp6hdr *ic)
{
	if (ic->type < NDISC_ROUTER_SOLICITATION || ic->type > NDISC_REDIRECT)
		return 0;
	if (ic->code != 0 || p->hop_limit != 255)
		return 0;
	const __u8 *d = p->t.dst;
	if (d[0] == 0xFE && (d[1] & 0xC0) == 0x80) /* fe80::/10 */
		return 1;
	if (d[0] == 0xFF && d[1] == 0x02) /* ff02::/16 */
		return 1;
	return delivered_locally_v6(ctx, d);
}

static __always_inline int classify_v6(struct xdp_md *ctx, void *data, void *data_end,
				       __u64 len, __u64 l3off, struct ip_info *p,
				       const struct config_value *cfg, __u64 now)
{
	int r = parse_v6(data, data_end, len, l3off, p);
	if (r)
		return r;

	if (p->frag != FRAG_LATER && p->t.proto == IPPROTO_ICMPV6) {
		struct icmp6hdr *ic = data + p->l4off;
		if ((void *)(ic + 1) > data_end || p->l4off + sizeof(*ic) > p->l3end)
			return REASON_MALFORMED;
		if (ndp_bypass(ctx, p, ic))
			return REASON_NDP;
	}
	return classify_ip(ctx, data, data_end, p, cfg, now);
}

/* Skips Ethernet and up to two VLAN tags. Returns the EtherType (network
 * order) and sets *l3off, or 0 for a truncated frame. */
static __always_inline __be16 parse_l2(void *data, void *data_end, __u64 *l3off)
{
	struct ethhdr *eth = data;
	__u64 off = sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return 0;

	__be16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlanhdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return 0;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}
	*l3off = off;
	return proto;
}

/*
 * Whether ip, the IPv4 header after an untagged Ethernet header, is the
 * common frame's: no options, not a fragment, and the datagram within the
 * first len bytes of the frame. The caller has checked that the header is
 * within the packet.
 */
static __always_inline int fast_ip4(const struct iphdr *ip, __u64 len)
{
	return ip->ver_ihl == 0x45 && !(ip->frag_off & bpf_htons(IP_OFFSET | IP_MF)) &&
	       sizeof(struct ethhdr) + bpf_ntohs(ip->tot_len) <= len;
}

/*
 * The common frame, parsed straight into t: untagged Ethernet, IPv4
 * without options or IPv6 without extension headers, not a fragment, a
 * TCP or UDP header within the datagram, the datagram within the first
 * buffer (len is that buffer's length: aegis_xdp). For such a
 * frame parse_l2, parse_v4/parse_v6 and parse_l4 reach the same tuple with
 * no drop reason, frag is FRAG_NONE, there is no quote to read and no
 * bypass but the controller's (which policy() checks first, as ever), so
 * classify() would return exactly policy(t): the fast path changes what
 * parses a frame, never what decides it. Returns 0 for any other frame,
 * having written nothing the general path reads: it starts over from a
 * zeroed ip_info.
 *
 * t is not zeroed: for IPv4 only the first 4 bytes of each address are
 * written, which is all the policy reads; event_emit() copies by family.
 */
static __always_inline int parse_fast(void *data, void *data_end, __u64 len, struct tuple *t)
{
	struct ethhdr *eth = data;
	void *l4;
	__u64 l3end;

	if (data + sizeof(*eth) + sizeof(struct iphdr) + sizeof(struct udphdr) > data_end)
		return 0; /* short frames: the general path sorts them out */

	__be16 type = *(__be16 *)(data + __builtin_offsetof(struct ethhdr, h_proto));
	if (type == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if (!fast_ip4(ip, len))
			return 0;
		l3end = sizeof(*eth) + bpf_ntohs(ip->tot_len);
		t->family = 4;
		t->proto = ip->protocol;
		*(__u32 *)t->src = ip->saddr;
		*(__u32 *)t->dst = ip->daddr;
		l4 = ip + 1;
	} else if (type == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || (*(__u8 *)ip6 >> 4) != 6)
			return 0;
		l3end = sizeof(*eth) + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		if (l3end > len)
			return 0;
		t->family = 6;
		t->proto = ip6->nexthdr;
		__builtin_memcpy(t->src, ip6->saddr, 16);
		__builtin_memcpy(t->dst, ip6->daddr, 16);
		l4 = ip6 + 1;
	} else {
		return 0;
	}

	__u64 l4off = l4 - data;
	if (t->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || l4off + sizeof(*th) > l3end)
			return 0;
		t->tcp_flags = th->flags;
	} else if (t->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end || l4off + sizeof(*uh) > l3end)
			return 0;
		t->tcp_flags = 0;
	} else {
		return 0;
	}
	/* TCP and UDP both start with the ports. */
	struct udphdr *ports = l4;
	t->sport = bpf_ntohs(ports->source);
	t->dport = bpf_ntohs(ports->dest);
	t->kind = L4_PORTS;
	return 1;
}

/* p, zeroed by the caller, is left holding as much of the tuple as parsed,
 * for the verdict event. */
static __always_inline int classify(struct xdp_md *ctx, void *data, void *data_end, __u64 len,
				    struct ip_info *p, const struct config_value *cfg, __u64 now)
{
	__u64 off = 0;
	__be16 proto = parse_l2(data, data_end, &off);

	if (!off)
		return REASON_MALFORMED;
	if (proto == bpf_htons(ETH_P_IP)) {
		int r = parse_v4(data, data_end, len, off, p);
		if (r)
			return r;
		return classify_ip(ctx, data, data_end, p, cfg, now);
	}
	if (proto == bpf_htons(ETH_P_IPV6))
		return classify_v6(ctx, data, data_end, len, off, p, cfg, now);
	if (proto == bpf_htons(ETH_P_ARP))
		return REASON_ARP;
	/* Includes a third VLAN tag. */
	return REASON_UNSUPPORTED_L3;
}

/* Every frame parse_fast() does not take, from a zeroed ip_info. */
static __always_inline int classify_slow(struct xdp_md *ctx, struct ip_info *p,
					 const struct config_value *cfg, __u64 len, __u64 now)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	__builtin_memset(p, 0, sizeof(*p));
	return classify(ctx, data, data_end, len, p, cfg, now);
}

/* The lane's test of the TCP or UDP header at l4, dlen bytes of the
 * datagram counted from hlen bytes before it: the header's mark kind, or
 * -1 to give up. The caller has checked that the ports are in the packet. */
static __always_inline int express_kind(void *l4, void *data_end, __u64 dlen, __u64 hlen,
					__u8 proto, __u8 family, const struct config_value *cfg)
{
	__u16 dport = bpf_ntohs(((struct udphdr *)l4)->dest);

	if (proto == IPPROTO_TCP) {
		if (l4 + sizeof(struct tcphdr) > data_end || dlen < hlen + sizeof(struct tcphdr))
			return -1;
		if (cfg->controller_family == family &&
		    (dport == cfg->controller_port || dport == cfg->grpc_port))
			return -1;
		return MARK_TCP;
	}
	if (proto == IPPROTO_UDP)
		return dlen < hlen + sizeof(struct udphdr) ? -1 : MARK_UDP;
	return -1;
}

/* The lane's lookup: the exact session behind key in map (the key is built
 * first, so that what the lookup needs is in memory, not in registers the
 * mark's inlined lookup would make the compiler save). */
static __always_inline int express_session(void *map, const void *key, __u32 kind, __u16 dport,
					   const struct config_value *cfg, __u64 now)
{
	if (!may_hold(kind, MARKS_SESSIONS_TRUSTED, dport))
		return REASON_NO_SESSION;
	struct session_value *v = bpf_map_lookup_elem(map, key);
	LOOKUP_APART(v);
	return session_outcome(v, cfg, now);
}

static __always_inline int express_v4(void *data, void *data_end, __u64 len,
				      const struct config_value *cfg, __u64 now)
{
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *uh = (void *)(ip + 1);

	if ((void *)(uh + 1) > data_end || !fast_ip4(ip, len))
		return -1;
	int kind = express_kind(uh, data_end, bpf_ntohs(ip->tot_len), sizeof(*ip), ip->protocol, 4, cfg);
	if (kind < 0)
		return -1;
	struct session_key_v4 k = {.dport = bpf_ntohs(uh->dest), .proto = ip->protocol};
	__builtin_memcpy(k.src, &ip->saddr, 4);
	__builtin_memcpy(k.dst, &ip->daddr, 4);
	return express_session(&sessions_v4, &k, kind, k.dport, cfg, now);
}

/* The same for parse_fast()'s IPv6 frame: no extension header, the
 * datagram within the first len bytes. */
static __always_inline int express_v6(void *data, void *data_end, __u64 len,
				      const struct config_value *cfg, __u64 now)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct udphdr *uh = (void *)(ip6 + 1);

	if ((void *)(uh + 1) > data_end || (*(__u8 *)ip6 >> 4) != 6)
		return -1;
	__u64 plen = bpf_ntohs(ip6->payload_len);
	if (sizeof(struct ethhdr) + sizeof(*ip6) + plen > len)
		return -1;
	int kind = express_kind(uh, data_end, plen, 0, ip6->nexthdr, 6, cfg);
	if (kind < 0)
		return -1;
	struct session_key_v6 k = {.dport = bpf_ntohs(uh->dest), .proto = ip6->nexthdr};
	__builtin_memcpy(k.src, ip6->saddr, 16);
	__builtin_memcpy(k.dst, ip6->daddr, 16);
	return express_session(&sessions_v6, &k, kind, k.dport, cfg, now);
}

/*
 * The express lane: exact_rules() for the common IPv4 or IPv6 frame
 * (parse_fast()'s: untagged, no IPv4 options or IPv6 extension headers,
 * not a fragment, TCP or UDP, within the first buffer), with the session
 * key built straight from the headers.
 * Most frames a gateway passes are a session's, so this is the one verdict
 * worth a path of its own; it saves the tuple's round trip through memory,
 * the general tail's choices and about half the hit's instructions. It
 * decides nothing differently:
 *
 * - It gives up (returns -1) before any lookup on every frame it could
 *   answer differently from exact_rules(): frames parse_fast() would not
 *   take, TCP to the controller's login or gRPC port while a controller
 *   of this family is set (a superset of what controller_bypass() admits),
 *   and every frame while pass events are on (an event needs the tuple).
 * - Otherwise it makes exact_rules()'s session lookup, port mark and all,
 *   and returns its result; the caller passes REASON_SESSION at once and
 *   hands anything else to policy(), which goes on from the rule after.
 *
 * So for every frame it answers, policy() would have answered the same,
 * and for every other frame policy() still does; the model test runs it
 * with pass events off to check that.
 */
static __always_inline int express(void *data, void *data_end, __u64 len,
				   const struct config_value *cfg, __u64 now)
{
	if (data + sizeof(struct ethhdr) > data_end || cfg->event_pass_rate)
		return -1;
	__be16 type = *(__be16 *)(data + __builtin_offsetof(struct ethhdr, h_proto));
	if (type == bpf_htons(ETH_P_IP))
		return express_v4(data, data_end, len, cfg, now);
	if (type == bpf_htons(ETH_P_IPV6))
		return express_v6(data, data_end, len, cfg, now);
	return -1;
}

/* Counts a frame of len bytes under reason. */
static __always_inline void count(__u32 reason, __u64 len)
{
	struct stats_value *s = bpf_map_lookup_elem(&stats, &reason);
	if (s) {
		s->packets++;
		s->bytes += len;
	}
}

/*
 * xdp.frags: the program accepts multi-buffer frames, so it attaches in
 * native mode to interfaces whose MTU exceeds a page (jumbo frames). The
 * headers it reads are always in the first buffer (data..data_end); the
 * IP length checks compare with the whole frame (len).
 *
 * The whole frame's length is another helper call, made only for frames
 * parse_fast() does not take: it takes a frame only when its IP datagram
 * ends within the first buffer, and then counts that buffer as the frame.
 * The two differ only by bytes a driver put in further buffers after the
 * datagram's end, which no driver does (Ethernet padding stays with the
 * frame it pads).
 */
SEC("xdp.frags")
int aegis_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	const struct config_value *cfg = &config_data;

	__u64 len = data_end - data;
	/* One clock read serves the verdict and its event. */
	__u64 now = clock_now();
	int exact = express(data, data_end, len, cfg, now);
	if (exact == REASON_SESSION) {
		count(REASON_SESSION, len);
		return XDP_PASS;
	}
	struct ip_info p;
	__u32 cause;
	/* p's address escapes into an empty asm, so that p stays one struct in
	 * memory. Otherwise the compiler splits it into a dozen scalars (the
	 * addresses byte by byte), shares them between both parsers, spills
	 * them to the stack and zeroes them on every branch, which costs the
	 * fast path what it saves. (A called function would do the same but
	 * would add a call per frame and a subprogram, whose instructions no
	 * longer match the object's tag, by which the loader recognises its
	 * own build.) */
	asm volatile("" : : "r"(&p) : "memory");
	if (parse_fast(data, data_end, len, &p.t)) {
		cause = policy(ctx, &p.t, &p.t, cfg, now, exact);
	} else {
		len = bpf_xdp_get_buff_len(ctx);
		cause = classify_slow(ctx, &p, cfg, len, now);
	}
	__u32 reason = cause;
	__u32 action = passes(reason) ? XDP_PASS : XDP_DROP;
	if (action == XDP_DROP && cfg->monitor) {
		reason = REASON_MONITOR;
		action = XDP_PASS;
	}

	count(reason, len);
	event_emit(ctx, cfg, &p.t, reason, cause, action, len, now);
	return action;
}

/*
 * Tombstones
 * ----------
 * A session key whose session left the sessions map (revoked, or deleted
 * by the reaper once expired) keeps a tombstone in tombs_v4/tombs_v6, keyed
 * like the session. While the session entry existed, no outbound packet
 * from its service to its user could open a flow (record() below); the
 * tombstone carries that refusal past the entry's deletion, so a service
 * that keeps sending to a revoked user (a stream, game state, keepalives)
 * still opens nothing the user could answer through. Each refused packet
 * refreshes the tombstone, with the sessions' refresh granularity; one
 * idle longer than the UDP flow idle timeout counts as absent, and the
 * reaper deletes it. A service quiet for that long and then sending again
 * opens a flow as any host behind the gateway opening one would.
 *
 * UDP's timeout for every key, TCP and any-protocol ones too: what a
 * service sends unprompted, again and again, is datagrams. A service's
 * TCP answers (SYN-ACK, ACK, FIN, RST) never open a flow, with or without
 * a tombstone; a TCP tombstone only refuses a bare SYN from the service's
 * port to the user (an active open from the listening port), and each
 * such SYN refreshes it. TCP's flow timeout (hours) would keep hours of
 * revocations in the map for that corner.
 *
 * User space writes them (internal/state: Revoke, and the reaper's sweep),
 * before it deletes the session, so that at every instant the session
 * entry or its tombstone exists; this program only reads them and writes
 * last_seen in place. A grant does not remove one: record() asks for a
 * session entry first, and a tombstone under an existing entry is never
 * consulted. The ingress program does not read them: a revoked user's
 * packets find no session and no flow and drop as no_session.
 *
 * They are looked up only where record() would otherwise create a flow,
 * so a packet of a live flow costs nothing more.
 */
enum tomb_cause {
	TOMB_REVOKED = 1, /* revoked */
	TOMB_EXPIRED = 2, /* expired, then deleted by the reaper */
};
const enum tomb_cause tomb_cause_btf SEC(".btf.anchor") __attribute__((unused));

struct tomb_value {
	__u64 last_seen_ns; /* the session's removal, or the last packet refused since */
	__u64 removed_ns;   /* when the session was removed */
	__u32 cause;        /* enum tomb_cause */
	__u32 pad;
};

/* As large as the sessions maps (the loader sizes both with
 * --max-sessions), so that the reaper can bury a whole map of sessions
 * expiring at once; a full map makes user space keep the dead session
 * entry instead (see internal/state). Allocated on insert. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct session_key_v4);
	__type(value, struct tomb_value);
} tombs_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct session_key_v6);
	__type(value, struct tomb_value);
} tombs_v6 SEC(".maps");

static __always_inline struct tomb_value *tomb_find(const struct tuple *t, __u8 proto)
{
	return session_keyed(&tombs_v4, &tombs_v6, t, proto);
}

/* Whether a live tombstone of proto refuses a flow for the reply r;
 * refreshes it if so. */
static __always_inline int tomb_refuses(const struct tuple *r, __u8 proto,
					const struct config_value *cfg, __u64 now)
{
	struct tomb_value *v = tomb_find(r, proto);
	return v && seen_live(&v->last_seen_ns, flow_idle(IPPROTO_UDP, cfg), now, 1);
}

/*
 * Records the flow an outbound packet belongs to (see "Flows" above): a
 * live flow is refreshed; otherwise a new one is created if the packet may
 * open one and its reply is not already admitted by a session or an allow
 * rule, and is not the reply of a removed session (see "Tombstones"). An
 * expired flow or tombstone counts as absent.
 */
static __always_inline void record(const struct tuple *o, const struct config_value *cfg)
{
	if (o->kind != L4_PORTS && o->kind != L4_ECHO_REQUEST)
		return;

	struct tuple r;
	reverse(o, &r);
	__u64 now = clock_now();

	struct flow_value *f = flow_find(&r);
	if (f && flow_live(f, r.proto, cfg, now, 1))
		return;

	if (o->proto == IPPROTO_TCP && (o->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return;
	if (r.kind == L4_PORTS) {
		if (session_find(&r, r.proto) || session_find(&r, 0))
			return;
		/* Both are looked up (and refreshed) when both exist, so that
		 * each lives as long as the service keeps sending. */
		if (tomb_refuses(&r, r.proto, cfg, now) | tomb_refuses(&r, 0, cfg, now))
			return;
	}
	if (allowed(&r, cfg))
		return;
	flow_create(&r, now);
}

/* Headers the egress parser may need in the linear part of an skb:
 * Ethernet, two tags, IPv6 and its extension headers, an L4 header. */
#define EGRESS_PULL 256

SEC("tcx/egress")
int aegis_egress(struct __sk_buff *skb)
{
	const struct config_value *cfg = &config_data;
	if (!cfg->track_flows)
		return TCX_NEXT;

	/* Headers of locally built and of forwarded packets are nearly always
	 * linear already; pulling unclones the skb, so do it only when the
	 * linear part is shorter than both the packet and what may be read. */
	__u32 linear = skb->data_end - skb->data;
	if (linear < EGRESS_PULL && linear < skb->len)
		bpf_skb_pull_data(skb, skb->len < EGRESS_PULL ? skb->len : EGRESS_PULL);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 off = 0;
	__be16 proto = parse_l2(data, data_end, &off);
	if (!off)
		return TCX_NEXT;

	struct ip_info p = {};
	int r;
	if (proto == bpf_htons(ETH_P_IP))
		r = parse_v4(data, data_end, skb->len, off, &p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = parse_v6(data, data_end, skb->len, off, &p);
	else
		return TCX_NEXT;
	if (r || p.frag == FRAG_LATER)
		return TCX_NEXT;
	if (parse_l4(data, data_end, p.l4off, p.l3end, &p.t))
		return TCX_NEXT;
	record(&p.t, cfg);
	return TCX_NEXT;
}

/*
 * aegis_locality answers delivered_locally() for user space: explaining a
 * bypass candidate needs the kernel's own answer (the same bpf_fib_lookup
 * from the same ingress interface), which no route query over netlink
 * reproduces (an input lookup without source validation, the ingress
 * interface's forwarding switch, its policy rules and VRF). User space
 * runs it with BPF_PROG_TEST_RUN on a frame whose IP header carries the
 * destination and the interface in the context's ingress_ifindex.
 * XDP_PASS: local; XDP_DROP: not; XDP_ABORTED: not an IP frame. It uses
 * no map, so running it changes nothing.
 */
SEC("xdp")
int aegis_locality(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	__u64 off = 0;
	__be16 proto = parse_l2(data, data_end, &off);
	struct ip_info p = {};
	int r;

	if (!off)
		return XDP_ABORTED;
	if (proto == bpf_htons(ETH_P_IP))
		r = parse_v4(data, data_end, len, off, &p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = parse_v6(data, data_end, len, off, &p);
	else
		return XDP_ABORTED;
	if (r)
		return XDP_ABORTED;
	return delivered_locally(ctx, &p.t) ? XDP_PASS : XDP_DROP;
}
