/* Shared between bpf/xdp_filter.bpf.c and user space (BPFSteer, through CBPF).
 * Every map key and value the two sides exchange is declared here, once. */
#ifndef L4LB_XDP_FILTER_H
#define L4LB_XDP_FILTER_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Who put an entry in a list; a map value is a set of these bits. An entry is removed
 * from the map only when no origin is left, so a reload that drops a config entry never
 * removes the same entry added at run time, and the reverse. */
enum l4lb_origin {
	L4LB_ORIGIN_CONFIG = 1 << 0,
	L4LB_ORIGIN_RUNTIME = 1 << 1,
};

/* LPM trie keys: prefixlen first, then the address in network byte order. */
struct l4lb_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct l4lb_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* blocked_ports is an array indexed by destination port (host byte order); the value
 * holds one origin set per protocol. */
struct l4lb_port_rule {
	__u8 tcp;
	__u8 udp;
};

#define L4LB_MAX_VLAN_DEPTH 2
#define L4LB_MAX_IPV6_EXT_DEPTH 6
#define L4LB_MAX_LPM_ENTRIES 65536

/* Verdict reasons, the index into l4lb_counters.packets. Keep in step with
 * FilterReason in BPFSteer. */
enum l4lb_reason {
	L4LB_PASS_NO_MATCH = 0,   /* nothing listed matched */
	L4LB_PASS_ALLOWED,        /* the source is in allowed_v4/v6 (overrides blocked_*) */
	L4LB_PASS_NOT_IP,         /* ARP, LLDP, ... */
	L4LB_PASS_MALFORMED,      /* truncated or bad header: the kernel's stack decides */
	L4LB_PASS_FRAGMENT,       /* a non-first fragment: no ports to check */
	L4LB_DROP_SOURCE_V4,
	L4LB_DROP_SOURCE_V6,
	L4LB_DROP_PORT_TCP,
	L4LB_DROP_PORT_UDP,
	L4LB_DROP_UNREACHABLE_PORTS, /* port rules exist, and a first fragment or an IPv6
	                                header chain hides the ports from the parser */
	L4LB_DROP_RATE_NEW_CONNECTIONS, /* a listener's rate_limit: over new_connections */
	L4LB_DROP_RATE_PACKETS,         /* a listener's rate_limit: over packets (UDP) */
	L4LB_REASON_COUNT,
};

/* settings[0]: what user space tells the program about the lists. */
struct l4lb_settings {
	__u32 port_rules; /* entries in blocked_ports (either protocol) */
	__u32 rate_rules; /* entries in rate_rules: 0 skips the rate limits' lookups */
};

/* Per-CPU counters keyed by ingress ifindex; key 0 counts interfaces user space has not
 * registered. */
struct l4lb_counters {
	__u64 packets[L4LB_REASON_COUNT];
};

/* Rate limits (a listener's `rate_limit`, enforced here when XDP sees all its traffic).
 *
 * rate_rules key: the listener's address (all zero: any address of the family; IPv4 in
 * the first four bytes), its port and protocol. */
struct l4lb_rate_listener {
	__u8 addr[16];
	__be16 port;
	__u8 protocol; /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 family;   /* 4, 6 */
};

/* A listener's limits. Intervals and tolerances are GCRA's, in nanoseconds: a unit costs
 * `interval`, and a source's bucket may run up to `tolerance` (burst x interval) ahead of
 * now. An interval of 0 turns that limit off. */
struct l4lb_rate_rule {
	__u32 id;        /* the listener's identity: keys its buckets, exempt entries, counters */
	__u8 prefix_v4;  /* sources are counted per prefix of this length */
	__u8 prefix_v6;
	__u8 udp_flows;  /* UDP: new_connections counts new flows (session: client) */
	__u8 pad;
	__u64 connection_interval, connection_tolerance;
	__u64 packet_interval, packet_tolerance;
	__u64 flow_idle_ns; /* a UDP source port silent this long starts a new flow */
};

/* rate_buckets (LRU): one per listener and source prefix. */
struct l4lb_rate_bucket_key {
	__u32 id;
	__u8 family;
	__u8 prefix;
	__u16 pad;
	__u8 addr[16]; /* masked to the prefix */
};

struct l4lb_rate_bucket {
	__u64 connection_tat; /* GCRA's theoretical arrival times, bpf_ktime_get_ns */
	__u64 packet_tat;
};

/* rate_flows (LRU): UDP flows seen lately, per listener and full source address + port. */
struct l4lb_rate_flow_key {
	__u32 id;
	__be16 port;
	__u8 family;
	__u8 pad;
	__u8 addr[16];
};

/* rate_exempt_v4/v6 (LPM tries): prefixlen = 32 (the id, always matched in full) + the
 * exempt prefix's length. */
struct l4lb_rate_exempt_v4 {
	__u32 prefixlen;
	__u32 id;
	__u8 addr[4];
};

struct l4lb_rate_exempt_v6 {
	__u32 prefixlen;
	__u32 id;
	__u8 addr[16];
};

/* rate_counters (per CPU, by listener id). */
struct l4lb_rate_counters {
	__u64 new_connections; /* dropped: over new_connections */
	__u64 packets;         /* dropped: over packets */
	__u64 exempt;          /* passed unlimited: the source is exempt */
};

/* rate_table[0] (per CPU): entries inserted into the LRU maps. Evictions are inserts
 * minus the entries still there (nothing else removes one). */
struct l4lb_rate_table {
	__u64 bucket_inserts;
	__u64 flow_inserts;
};

#define L4LB_MAX_RATE_RULES 4096
#define L4LB_MAX_RATE_EXEMPT 65536

#endif
