// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* l4lb's in-kernel UDP relay: a tc program on `lo` ingress. Once a worker has picked a
 * session's endpoint it installs two flows, and from then on every datagram of the
 * session is rewritten here and goes straight to the other side's socket:
 *
 *   client -> listener        becomes  upstream socket -> endpoint
 *   endpoint -> upstream sock becomes  listener -> client
 *
 * Checksums are fixed incrementally; each flow counts its datagrams, payload bytes and
 * last activity for the worker to fold into its stats. A packet that matches no flow,
 * and anything the parser does not follow (fragments, IPv4 options, IPv6 extension
 * headers, ICMP), goes on untouched to the next program or the stack. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "nat_addresses.bpf.h"
#include "udp_relay.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define IPPROTO_UDP_NUMBER 17
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

#define IP4_SRC_OFF (ETH_HLEN + 12)
#define IP4_CSUM_OFF (ETH_HLEN + 10)
#define UDP4_OFF (ETH_HLEN + 20)
#define IP6_SRC_OFF (ETH_HLEN + 8)
#define UDP6_OFF (ETH_HLEN + 40)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18); /* user space sizes it */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_relay_key);
	__type(value, struct l4lb_relay_flow);
} relay_flows SEC(".maps");

/* Counts the datagram on its flow and rewrites its addresses and ports. `length` is the
 * address length (4 or 16), `udp` the UDP header's offset. */
static __always_inline int rewrite(struct __sk_buff *skb, struct l4lb_relay_key *key, struct l4lb_relay_flow *flow,
				   __u32 length, __u32 address_offset, __u32 udp, __u16 udp_length)
{
	__u32 old_addresses[8] = {}, new_addresses[8] = {};
	__be16 new_sport = flow->sport, new_dport = flow->dport;

	__s64 diff = nat_addresses(key->saddr, key->daddr, flow->saddr, flow->daddr, length, old_addresses, new_addresses);
	if (diff < 0)
		return TC_ACT_UNSPEC;
	/* IPv4's header checksum covers the addresses; the UDP checksum covers them through
	 * its pseudo-header (a zero IPv4 UDP checksum, "none", stays zero; a sum that comes
	 * out zero is written as 0xffff). */
	__u64 mangled = BPF_F_MARK_MANGLED_0;
	/* From here on the packet is half rewritten if a helper fails: it is dropped. */
	if (length == 4 && bpf_l3_csum_replace(skb, IP4_CSUM_OFF, 0, diff, 0))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, udp + 6, 0, diff, BPF_F_PSEUDO_HDR | mangled))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, udp + 6, key->sport, new_sport, 2 | mangled))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, udp + 6, key->dport, new_dport, 2 | mangled))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, address_offset, new_addresses, length * 2, 0))
		return TC_ACT_SHOT;
	__be16 ports[2] = {new_sport, new_dport};
	if (bpf_skb_store_bytes(skb, udp, ports, 4, BPF_F_INVALIDATE_HASH))
		return TC_ACT_SHOT;

	/* Counted once rewritten. A UDP GSO packet (a UDP_SEGMENT sender) crosses lo whole:
	 * one header, the payload of all its datagrams. */
	__u32 segments = skb->gso_segs > 1 ? skb->gso_segs : 1;
	__u32 payload = segments > 1 ? (skb->len > udp + 8 ? skb->len - udp - 8 : 0) : (udp_length > 8 ? udp_length - 8 : 0);
	__sync_fetch_and_add(&flow->packets, segments);
	__sync_fetch_and_add(&flow->bytes, payload);
	flow->last_ns = bpf_ktime_get_ns();
	return TC_ACT_OK;
}

SEC("tc")
int l4lb_udp_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct l4lb_relay_key key = {};
	struct l4lb_relay_flow *flow;
	struct udphdr *udp;
	__u32 length, address_offset, udp_offset;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_UNSPEC;
		/* Options move the UDP header; fragments carry no ports (or not all the datagram). */
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP_NUMBER || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return TC_ACT_UNSPEC;
		udp = (void *)(ip + 1);
		key.family = 4;
		__builtin_memcpy(key.saddr, &ip->saddr, 4);
		__builtin_memcpy(key.daddr, &ip->daddr, 4);
		length = 4, address_offset = IP4_SRC_OFF, udp_offset = UDP4_OFF;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_UNSPEC;
		/* Extension headers (a fragment header among them) are left to the stack. */
		if (ip6->nexthdr != IPPROTO_UDP_NUMBER)
			return TC_ACT_UNSPEC;
		udp = (void *)(ip6 + 1);
		key.family = 6;
		__builtin_memcpy(key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(key.daddr, &ip6->daddr, 16);
		length = 16, address_offset = IP6_SRC_OFF, udp_offset = UDP6_OFF;
	} else {
		return TC_ACT_UNSPEC;
	}
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_UNSPEC;
	key.sport = udp->source;
	key.dport = udp->dest;
	flow = bpf_map_lookup_elem(&relay_flows, &key);
	if (!flow)
		return TC_ACT_UNSPEC;
	return rewrite(skb, &key, flow, length, address_offset, udp_offset, bpf_ntohs(udp->len));
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
