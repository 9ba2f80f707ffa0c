/* Shared between bpf/kernel_relay.bpf.c and user space (BPFSteer, through CBPF): the
 * kernel forwarder's flow table (issue 35; docs/kernel-forwarding-plan.md). A flow is
 * two entries, one per direction, each keyed by the 5-tuple of the packets as they
 * arrive, each saying what those packets' addresses and ports become. */
#ifndef L4LB_KERNEL_RELAY_H
#define L4LB_KERNEL_RELAY_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Addresses in network byte order; an IPv4 address fills the first 4 bytes and the rest
 * are zero. `family` is 4 or 6, `protocol` 6 (TCP) or 17 (UDP); `pad` is always zero (the
 * key is compared as bytes). */
struct l4lb_kr_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 family;
	__u16 pad;
};

/* What a matching packet's addresses and ports become, and what the program counted on
 * this direction: packets (GSO segments), L4 payload bytes, last one (CLOCK_MONOTONIC ns). */
struct l4lb_kr_flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u16 listener; /* identity of the listener the flow came in on */
	__u16 endpoint; /* kernel slot of its endpoint (kernel-started flows); L4LB_KR_NO_SLOT else */
	__u8 state;     /* L4LB_KR_STATE_* bits; FIN and RST are seen on this direction and only grow */
	__u8 pad[3];
	__u32 seq_next; /* TCP: the sequence number after the furthest byte seen (L4LB_KR_STATE_SEQ) */
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

#define L4LB_KR_STATE_FIN 1
#define L4LB_KR_STATE_RST 2
/* Installed by a worker for one of its UDP sessions, which ends it (and counts it): the
 * sweeper leaves it. */
#define L4LB_KR_STATE_SESSION 4
/* The endpoint's direction (endpoint -> client), for the per-listener counts. */
#define L4LB_KR_STATE_REPLY 8
/* seq_next holds a sequence number: a TCP packet has been seen on this direction. */
#define L4LB_KR_STATE_SEQ 16
/* The client's direction of a kernel-started TCP flow: the client acknowledged the
 * endpoint's SYN-ACK (its ACK number is the reply direction's seq_next). Until then the
 * flow is half open, and expires at the listener's connect_timeout: a spoofed SYN, which
 * never gets that far, holds its entries no longer. */
#define L4LB_KR_STATE_ESTABLISHED 32
/* The reply entry of a kernel-started TCP flow whose endpoint has answered its SYN (a SYN-ACK,
 * a RST, or an ICMP error): the connect was counted, once. */
#define L4LB_KR_STATE_ANSWERED 64
#define L4LB_KR_NO_SLOT 0xFFFF

/* What the program counts per listener (kr_listener_stats, by identity) and per endpoint
 * (kr_endpoint_stats, by kernel slot) for the flows it started, per CPU: `in` is the
 * client's direction, `out` the endpoint's; bytes are TCP payload, each byte once (a
 * retransmission adds nothing: the count follows the furthest sequence number). `fallbacks`: SYNs to the listener left to the stack (per listener only). */
struct l4lb_kr_traffic {
	__u64 packets_in;
	__u64 bytes_in;
	__u64 packets_out;
	__u64 bytes_out;
	__u64 flows;
	__u64 fallbacks;
	/* The endpoint's answers to the SYNs of the flows the kernel started: a SYN-ACK, or a RST
	 * or ICMP error (outlier detection counts these as the proxy's connect results). */
	__u64 connect_successes;
	__u64 connect_failures;
};

/* What the program counts for the whole table (per CPU; user space sums them): indexes
 * of kr_counters. */
enum l4lb_kr_counter {
	L4LB_KR_FORWARDED = 0,       /* packets rewritten and redirected to their egress interface */
	L4LB_KR_DROP_NO_ROUTE,       /* the FIB had no usable route to the rewritten destination */
	L4LB_KR_DROP_FORWARDING_OFF, /* forwarding is off on the interface the packet arrived on */
	L4LB_KR_DROP_MTU,            /* the rewritten packet is bigger than the egress MTU */
	L4LB_KR_NEW_FLOWS,           /* SYNs to a service that the kernel took: an endpoint picked, both entries in */
	/* SYNs to a service left to the stack (and so to the proxy), by reason. */
	L4LB_KR_FALLBACK_PAUSED,     /* the service is paused: user space enforces a list the kernel cannot */
	L4LB_KR_FALLBACK_NO_ENDPOINT, /* no plan, or no endpoint available */
	L4LB_KR_FALLBACK_NO_ROUTE,   /* no route (or source address) toward the endpoint */
	L4LB_KR_FALLBACK_NO_PORT,    /* 32 NAT ports probed, all taken toward that endpoint */
	L4LB_KR_FALLBACK_TABLE_FULL, /* the flow table had no room */
	L4LB_KR_NAT_PORT_REUSED,     /* a new flow took the NAT port of one closed both ways (or reset) */
	L4LB_KR_ICMP_TRANSLATED,     /* ICMP errors about a kernel flow's packets sent on to their sender */
	L4LB_KR_MSS_CLAMPED,         /* SYNs and SYN-ACKs whose MSS was lowered to the route's MTU */
	L4LB_KR_COUNTER_COUNT,
};

/* A service: the address, port and protocol a listener with relay: kernel takes. */
struct l4lb_kr_service_key {
	__u8 addr[16];
	__be16 port;
	__u8 protocol;
	__u8 family;
};

#define L4LB_KR_SERVICE_PAUSED 1

struct l4lb_kr_service {
	__u32 listener; /* identity: the index of its plan in kr_plans */
	__u32 flags;
};

/* An endpoint behind kernel listeners, by kernel slot (plans name slots). */
struct l4lb_kr_endpoint {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 unavailable; /* non-zero: unhealthy, ejected or draining; picks skip it */
	__u32 identity;
	__u64 cluster_tag;
};

#define L4LB_KR_LISTENERS 1024
#define L4LB_KR_ENDPOINT_SLOTS 8192

/* A plan, one per kernel listener: u32 words. The header, then by kind:
 *   maglev: [8, 8+M) the Maglev table as endpoint slots (NONE where empty),
 *           [8+M, 8+M+n) the cluster's endpoints in config order (slot, WEIGHT_ZERO bit)
 *   random: [8, 8+n) the alias table's keep, [8+n, 8+2n) its alias column, then the
 *           endpoints in config order as for maglev */
enum l4lb_kr_plan_word {
	L4LB_KR_PLAN_KIND = 0,
	L4LB_KR_PLAN_SIZE = 1,     /* maglev: M (prime); random: n */
	L4LB_KR_PLAN_COUNT = 2,    /* n: endpoints of the cluster */
	L4LB_KR_PLAN_HASH_KEY = 3,
	L4LB_KR_PLAN_CLUSTER = 4,
	L4LB_KR_PLAN_GENERATION = 5,
	L4LB_KR_PLAN_HEADER = 8,
};

#define L4LB_KR_PLAN_MAGLEV 1
#define L4LB_KR_PLAN_RANDOM 2
#define L4LB_KR_HASH_SOURCE_IP 0
#define L4LB_KR_HASH_SOURCE_IP_PORT 1
#define L4LB_KR_HASH_FIVE_TUPLE 2
#define L4LB_KR_PLAN_WEIGHT_ZERO 0x80000000u
#define L4LB_KR_PLAN_NONE 0xFFFFFFFFu

/* Settings user space writes once, at start: kr_settings[0]. */
struct l4lb_kr_settings {
	__u32 nat_port_first;
	__u32 nat_port_count; /* 0: new flows are left to the stack */
};

#endif
