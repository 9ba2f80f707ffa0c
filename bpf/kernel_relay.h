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
	__u32 pad;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

/* What the program counts for the whole table (per CPU; user space sums them): indexes
 * of kr_counters. */
enum l4lb_kr_counter {
	L4LB_KR_FORWARDED = 0,       /* packets rewritten and redirected to their egress interface */
	L4LB_KR_DROP_NO_ROUTE,       /* the FIB had no usable route to the rewritten destination */
	L4LB_KR_DROP_FORWARDING_OFF, /* forwarding is off on the interface the packet arrived on */
	L4LB_KR_DROP_MTU,            /* the rewritten packet is bigger than the egress MTU */
	L4LB_KR_COUNTER_COUNT,
};

#endif
