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
	L4LB_REASON_COUNT,
};

/* settings[0]: what user space tells the program about the lists. */
struct l4lb_settings {
	__u32 port_rules; /* entries in blocked_ports (either protocol) */
};

/* Per-CPU counters keyed by ingress ifindex; key 0 counts interfaces user space has not
 * registered. */
struct l4lb_counters {
	__u64 packets[L4LB_REASON_COUNT];
};

#endif
