// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* l4lb's XDP filter: drop packets from blocked sources, or to blocked ports, before the
 * kernel's stack (and l4lb) spends anything on them.
 *
 *   allowed_v4/v6 match  -> pass (overrides blocked_v4/v6)
 *   blocked_v4/v6 match  -> drop
 *   blocked_ports match  -> drop (per protocol, on the destination port)
 *   over a rate limit    -> drop (rate_limit.bpf.h: the listeners user space hands over)
 *   anything else        -> pass
 *
 * Headers the parser cannot follow (truncated, bad lengths, too many VLAN tags) pass and
 * are counted: the kernel rejects what is really broken. The exception is a packet the
 * kernel would accept whose ports the parser cannot see — a first fragment cut before
 * them, or an IPv6 chain deeper than it follows: while any port rule exists it is
 * dropped (`unreachable_ports`), so extension headers or tiny fragments cannot carry a
 * packet past a port rule. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xdp_filter.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define NEXTHDR_HOP 0
#define NEXTHDR_TCP 6
#define NEXTHDR_UDP 17
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_LPM_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_lpm_v4);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blocked_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_LPM_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_lpm_v6);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blocked_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_LPM_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_lpm_v4);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allowed_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_LPM_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_lpm_v6);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allowed_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct l4lb_port_rule);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blocked_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4lb_settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct l4lb_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

#include "rate_limit.bpf.h"

static __always_inline int verdict(struct xdp_md *ctx, enum l4lb_reason reason)
{
	__u32 key = ctx->ingress_ifindex;
	struct l4lb_counters *c = bpf_map_lookup_elem(&counters, &key);
	if (!c) {
		key = 0;
		c = bpf_map_lookup_elem(&counters, &key);
	}
	if (c && reason < L4LB_REASON_COUNT)
		c->packets[reason]++;
	return reason >= L4LB_DROP_SOURCE_V4 ? XDP_DROP : XDP_PASS;
}

/* Source verdict: -1 when nothing matched, else the reason. */
static __always_inline int source_v4(__u32 saddr)
{
	struct l4lb_lpm_v4 key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, &saddr, 4);
	if (bpf_map_lookup_elem(&allowed_v4, &key))
		return L4LB_PASS_ALLOWED;
	if (bpf_map_lookup_elem(&blocked_v4, &key))
		return L4LB_DROP_SOURCE_V4;
	return -1;
}

static __always_inline int source_v6(const struct in6_addr *saddr)
{
	struct l4lb_lpm_v6 key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, saddr, 16);
	if (bpf_map_lookup_elem(&allowed_v6, &key))
		return L4LB_PASS_ALLOWED;
	if (bpf_map_lookup_elem(&blocked_v6, &key))
		return L4LB_DROP_SOURCE_V6;
	return -1;
}

static __always_inline int port_rules_exist(void)
{
	__u32 zero = 0;
	struct l4lb_settings *s = bpf_map_lookup_elem(&settings, &zero);
	return s && s->port_rules > 0;
}

/* Destination-port (then rate-limit) verdict for a TCP or UDP header at `l4`.
 * `first_fragment`: the packet is the first of several, which the kernel reassembles
 * whatever this one holds. `saddr`/`daddr`: the IP header's addresses (`family` 4 or 6). */
static __always_inline int ports(struct xdp_md *ctx, void *l4, void *data_end, __u8 protocol,
				 int source, int first_fragment, int family, const void *saddr, const void *daddr)
{
	if (protocol != NEXTHDR_TCP && protocol != NEXTHDR_UDP)
		return verdict(ctx, source >= 0 ? source : L4LB_PASS_NO_MATCH);
	/* Both headers start with source and destination ports. */
	__be16 *port_pair = l4;
	if ((void *)(port_pair + 2) > data_end) {
		if (first_fragment && port_rules_exist())
			return verdict(ctx, L4LB_DROP_UNREACHABLE_PORTS);
		return verdict(ctx, L4LB_PASS_MALFORMED);
	}
	__u32 port = bpf_ntohs(port_pair[1]);
	struct l4lb_port_rule *rule = bpf_map_lookup_elem(&blocked_ports, &port);
	if (rule) {
		if (protocol == NEXTHDR_TCP && rule->tcp)
			return verdict(ctx, L4LB_DROP_PORT_TCP);
		if (protocol == NEXTHDR_UDP && rule->udp)
			return verdict(ctx, L4LB_DROP_PORT_UDP);
	}
	int limited = rate_limit(family, saddr, daddr, l4, data_end, protocol);
	if (limited >= 0)
		return verdict(ctx, limited);
	return verdict(ctx, source >= 0 ? source : L4LB_PASS_NO_MATCH);
}

static __always_inline int filter_v4(struct xdp_md *ctx, void *l3, void *data_end)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > data_end)
		return verdict(ctx, L4LB_PASS_MALFORMED);
	__u32 header_length = ip->ihl * 4;
	if (header_length < sizeof(*ip) || l3 + header_length > data_end)
		return verdict(ctx, L4LB_PASS_MALFORMED);

	int source = source_v4(ip->saddr);
	if (source == L4LB_DROP_SOURCE_V4)
		return verdict(ctx, source);
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return verdict(ctx, source >= 0 ? source : L4LB_PASS_FRAGMENT);
	return ports(ctx, l3 + header_length, data_end, ip->protocol, source,
		     (ip->frag_off & bpf_htons(IP_MF)) != 0, 4, &ip->saddr, &ip->daddr);
}

static __always_inline int filter_v6(struct xdp_md *ctx, void *l3, void *data_end)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > data_end)
		return verdict(ctx, L4LB_PASS_MALFORMED);

	int source = source_v6(&ip6->saddr);
	if (source == L4LB_DROP_SOURCE_V6)
		return verdict(ctx, source);

	__u8 next = ip6->nexthdr;
	void *cursor = ip6 + 1;
	int first_fragment = 0;
#pragma unroll
	for (int depth = 0; depth < L4LB_MAX_IPV6_EXT_DEPTH; depth++) {
		if (next == NEXTHDR_TCP || next == NEXTHDR_UDP)
			return ports(ctx, cursor, data_end, next, source, first_fragment, 6, &ip6->saddr, &ip6->daddr);
		if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST &&
		    next != NEXTHDR_FRAGMENT && next != NEXTHDR_AUTH)
			return verdict(ctx, source >= 0 ? source : L4LB_PASS_NO_MATCH);
		struct ipv6_opt_hdr *ext = cursor;
		if ((void *)(ext + 1) > data_end)
			return verdict(ctx, L4LB_PASS_MALFORMED);
		if (next == NEXTHDR_FRAGMENT) {
			struct frag_hdr *frag = cursor;
			if ((void *)(frag + 1) > data_end)
				return verdict(ctx, L4LB_PASS_MALFORMED);
			if (frag->frag_off & bpf_htons(0xFFF8))
				return verdict(ctx, source >= 0 ? source : L4LB_PASS_FRAGMENT);
			first_fragment = (frag->frag_off & bpf_htons(1)) != 0;
			next = frag->nexthdr;
			cursor = frag + 1;
			continue;
		}
		__u32 length = next == NEXTHDR_AUTH ? (ext->hdrlen + 2) * 4 : (ext->hdrlen + 1) * 8;
		next = ext->nexthdr;
		cursor += length;
	}
	/* Six extension headers followed; the seventh header may still be the transport. */
	if (next == NEXTHDR_TCP || next == NEXTHDR_UDP)
		return ports(ctx, cursor, data_end, next, source, first_fragment, 6, &ip6->saddr, &ip6->daddr);
	if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST &&
	    next != NEXTHDR_FRAGMENT && next != NEXTHDR_AUTH)
		return verdict(ctx, source >= 0 ? source : L4LB_PASS_NO_MATCH);
	/* Deeper than the parser follows: the ports were not seen. */
	return verdict(ctx, port_rules_exist() ? L4LB_DROP_UNREACHABLE_PORTS : L4LB_PASS_MALFORMED);
}

SEC("xdp")
int l4lb_xdp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return verdict(ctx, L4LB_PASS_MALFORMED);

	__u16 protocol = eth->h_proto;
	void *cursor = eth + 1;
#pragma unroll
	for (int depth = 0; depth < L4LB_MAX_VLAN_DEPTH; depth++) {
		if (protocol != bpf_htons(ETH_P_8021Q) && protocol != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr *vlan = cursor;
		if ((void *)(vlan + 1) > data_end)
			return verdict(ctx, L4LB_PASS_MALFORMED);
		protocol = vlan->h_vlan_encapsulated_proto;
		cursor = vlan + 1;
	}

	if (protocol == bpf_htons(ETH_P_IP))
		return filter_v4(ctx, cursor, data_end);
	if (protocol == bpf_htons(ETH_P_IPV6))
		return filter_v6(ctx, cursor, data_end);
	if (protocol == bpf_htons(ETH_P_8021Q) || protocol == bpf_htons(ETH_P_8021AD))
		return verdict(ctx, L4LB_PASS_MALFORMED);
	return verdict(ctx, L4LB_PASS_NOT_IP);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
