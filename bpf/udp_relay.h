/* Shared between bpf/udp_relay.bpf.c and user space (BPFSteer, through CBPF): the UDP
 * relay's flow table. A session the worker hands to the kernel is two flows, one per
 * direction, each keyed by the datagram's addresses as they arrive on `lo`. */
#ifndef L4LB_UDP_RELAY_H
#define L4LB_UDP_RELAY_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Addresses in network byte order; an IPv4 address fills the first 4 bytes, the rest are
 * zero. `family` is 4 or 6. */
struct l4lb_relay_key {
	__u8 family;
	__u8 pad[3];
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* What a matching datagram's addresses and ports become, and what the program counted:
 * datagrams, UDP payload bytes, and when the last one passed (CLOCK_MONOTONIC, ns). */
struct l4lb_relay_flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 pad;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

#endif
