/* The kernel forwarder's path-MTU work (issue 35, step 11 of docs/kernel-forwarding-plan.md):
 * ICMP errors about the packets of a kernel flow translated back through the NAT to the
 * host that sent them, and the MSS of a flow's SYN and SYN-ACK clamped to the route it
 * leaves by. Included by kernel_relay.bpf.c, after its maps, `count`, `route` and `parsed`. */
#ifndef L4LB_KERNEL_RELAY_ICMP_BPF_H
#define L4LB_KERNEL_RELAY_ICMP_BPF_H

#define PROTO_ICMP 1
#define PROTO_ICMPV6 58
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETER_PROBLEM 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PORT_UNREACH 4
#define ICMPV6_PACKET_TOO_BIG 2
#define ICMPV6_TIME_EXCEEDED 3
#define TCP_OPTION_END 0
#define TCP_OPTION_NOP 1
#define TCP_OPTION_MSS 2

/* The part of a quoted packet the translation reads and rewrites: its addresses and ports. */
struct quoted {
	__u8 addresses[32]; /* source then destination: IPv4 in the first 8 bytes */
	__be16 ports[2];
};

/* Room for the translation beyond the 512-byte stack, which the main program shares. */
struct icmp_scratch {
	struct quoted old;
	struct quoted new;
	struct l4lb_kr_tuple key;
	__u8 outer_source[16];
	__u8 outer_destination[16];
	__u32 old_outer[8];
	__u32 new_outer[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
} kr_icmp_scratch SEC(".maps");

/* An ICMP error about a packet this program sent for a kernel flow: a router beyond l4lb
 * saying "fragmentation needed" (or "packet too big", "time exceeded", "unreachable")
 * about `NAT:n -> endpoint:e`. The quoted packet is what a flow entry produced, so the
 * other direction's entry, keyed by the quoted tuple swapped, says what its sender sent:
 * `endpoint:e -> NAT:n` becomes `listener:l -> client:c`. The quote becomes `client:c ->
 * listener:l`, the error goes from `listener` to `client`, and the client's stack, which
 * knows that connection, learns the path MTU (or the failure) as if l4lb were not there.
 * Errors about a worker's UDP session are left to the stack: the session's socket must see
 * them (a port unreachable is how a session fails over). 0 when translated and routed,
 * with `out` set; TCX_NEXT for anything else. */
static __noinline int translate_icmp(struct __sk_buff *skb, struct parsed *p, __u8 family, struct egress *out)
{
	__u8 header[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, header, 2))
		return TCX_NEXT;
	__u8 type = header[0];
	if (family == 4 && type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETER_PROBLEM)
		return TCX_NEXT;
	if (family == 6 && type != ICMPV6_DEST_UNREACH && type != ICMPV6_PACKET_TOO_BIG && type != ICMPV6_TIME_EXCEEDED)
		return TCX_NEXT;

	/* The quoted packet: its IP header right after the 8-byte ICMP header, then 8 bytes
	 * of its TCP or UDP header at least (both families quote that much). */
	__u32 zero = 0;
	struct icmp_scratch *s = bpf_map_lookup_elem(&kr_icmp_scratch, &zero);
	if (!s)
		return TCX_NEXT;
	__u32 inner = p->l4_off + 8, inner_l4;
	__u8 inner_protocol;
	__builtin_memset(s, 0, sizeof(*s));
	if (family == 4) {
		__u8 first[10];
		if (bpf_skb_load_bytes(skb, inner, first, 10) || (first[0] & 0x0F) != 5)
			return TCX_NEXT;
		inner_protocol = first[9];
		if (bpf_skb_load_bytes(skb, inner + 12, s->old.addresses, 8))
			return TCX_NEXT;
		inner_l4 = inner + 20;
	} else {
		__u8 first[8];
		if (bpf_skb_load_bytes(skb, inner, first, 8))
			return TCX_NEXT;
		inner_protocol = first[6];
		if (bpf_skb_load_bytes(skb, inner + 8, s->old.addresses, 32))
			return TCX_NEXT;
		inner_l4 = inner + 40;
	}
	if (inner_protocol != PROTO_TCP && inner_protocol != PROTO_UDP)
		return TCX_NEXT;
	if (bpf_skb_load_bytes(skb, inner_l4, s->old.ports, 4))
		return TCX_NEXT;

	/* The error must be addressed to the quoted packet's sender: l4lb's address. */
	__u8 *outer_destination = s->outer_destination;
	if (family == 4 ? bpf_skb_load_bytes(skb, IP4_SRC_OFF + 4, outer_destination, 4) : bpf_skb_load_bytes(skb, IP6_SRC_OFF + 16, outer_destination, 16))
		return TCX_NEXT;
	if (__builtin_memcmp(outer_destination, s->old.addresses, 4) != 0 ||
	    (family == 6 && __builtin_memcmp(outer_destination + 4, s->old.addresses + 4, 12) != 0))
		return TCX_NEXT;

	struct l4lb_kr_tuple *key = &s->key;
	if (family == 4) {
		__builtin_memcpy(key->saddr, s->old.addresses + 4, 4);
		__builtin_memcpy(key->daddr, s->old.addresses, 4);
	} else {
		__builtin_memcpy(key->saddr, s->old.addresses + 16, 16);
		__builtin_memcpy(key->daddr, s->old.addresses, 16);
	}
	key->sport = s->old.ports[1];
	key->dport = s->old.ports[0];
	key->protocol = inner_protocol;
	key->family = family;
	struct l4lb_kr_flow *flow = bpf_map_lookup_elem(&kr_flows, key);
	if (!flow || (flow->state & L4LB_KR_STATE_SESSION))
		return TCX_NEXT;
	/* An error about a SYN l4lb sent the endpoint, before any answer from it: a failed
	 * connect (the key is the reply entry's). */
	if (inner_protocol == PROTO_TCP && (flow->state & L4LB_KR_STATE_REPLY))
		count_connect(flow, 1);

	/* What the quoted packet's sender sent, and where the error goes. */
	if (family == 4) {
		__builtin_memcpy(s->new.addresses, flow->daddr, 4);
		__builtin_memcpy(s->new.addresses + 4, flow->saddr, 4);
	} else {
		__builtin_memcpy(s->new.addresses, flow->daddr, 16);
		__builtin_memcpy(s->new.addresses + 16, flow->saddr, 16);
	}
	s->new.ports[0] = flow->dport;
	s->new.ports[1] = flow->sport;

	int verdict = route(skb, flow, family == 4 ? PROTO_ICMP : PROTO_ICMPV6, p, out);
	if (verdict)
		return verdict;

	/* Checksums. The ICMP sum covers the quote: its ports change, and over IPv6 its
	 * addresses (IPv4's change with the quoted header's own checksum, which keeps that
	 * header's sum as it was) and the pseudo-header's outer addresses. The quoted TCP or
	 * UDP checksum stays: nothing checks it. */
	__u32 icmp_csum = p->l4_off + 2;
	__s64 ports = bpf_csum_diff((__u32 *)s->old.ports, 4, (__u32 *)s->new.ports, 4, 0);
	if (ports < 0 || bpf_l4_csum_replace(skb, icmp_csum, 0, ports, 0))
		return TC_ACT_SHOT;
	if (family == 4 ? bpf_skb_load_bytes(skb, IP4_SRC_OFF, s->outer_source, 4) : bpf_skb_load_bytes(skb, IP6_SRC_OFF, s->outer_source, 16))
		return TC_ACT_SHOT;
	__s64 outer = nat_addresses(s->outer_source, outer_destination, flow->saddr, flow->daddr, p->length, s->old_outer, s->new_outer);
	if (outer < 0)
		return TC_ACT_SHOT;
	if (family == 4) {
		__s64 quoted = bpf_csum_diff((__u32 *)s->old.addresses, 8, (__u32 *)s->new.addresses, 8, 0);
		if (quoted < 0 || bpf_l3_csum_replace(skb, inner + 10, 0, quoted, 0))
			return TC_ACT_SHOT;
		__be16 old_word = bpf_htons((__u16)p->hop << 8 | PROTO_ICMP);
		__be16 new_word = bpf_htons((__u16)(p->hop - 1) << 8 | PROTO_ICMP);
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, 0, outer, 0) || bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_word, new_word, 2))
			return TC_ACT_SHOT;
		__u8 ttl = p->hop - 1;
		if (bpf_skb_store_bytes(skb, IP4_TTL_OFF, &ttl, 1, 0))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, inner + 12, s->new.addresses, 8, 0))
			return TC_ACT_SHOT;
	} else {
		__s64 quoted = bpf_csum_diff((__u32 *)s->old.addresses, 32, (__u32 *)s->new.addresses, 32, 0);
		if (quoted < 0 || bpf_l4_csum_replace(skb, icmp_csum, 0, quoted, 0) ||
		    bpf_l4_csum_replace(skb, icmp_csum, 0, outer, BPF_F_PSEUDO_HDR))
			return TC_ACT_SHOT;
		__u8 hop = p->hop - 1;
		if (bpf_skb_store_bytes(skb, IP6_HOP_OFF, &hop, 1, 0))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, inner + 8, s->new.addresses, 32, 0))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, inner_l4, s->new.ports, 4, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, p->address_off, s->new_outer, p->length * 2, BPF_F_INVALIDATE_HASH))
		return TC_ACT_SHOT;
	count(L4LB_KR_ICMP_TRANSLATED);
	return 0;
}

/* A SYN or SYN-ACK of a kernel flow: the MSS it carries tells its receiver how large a
 * segment to send back to its sender, and those segments leave l4lb by its route toward
 * that sender. An MSS larger than that route can carry (its MTU less 40 bytes of headers,
 * 60 over IPv6) becomes that, as a router clamping MSS would, so both ends size their
 * segments for the narrowest link l4lb knows of and need no ICMP for it. `key` is the
 * packet as it arrived (its source is the sender). Any failure leaves the option as it
 * was. 1 when clamped. */
static __noinline int clamp_mss(struct __sk_buff *skb, struct l4lb_kr_tuple *key, struct parsed *p)
{
	struct bpf_fib_lookup fib;
	fib_between(&fib, skb, p->length, key->daddr, key->saddr, PROTO_TCP);
	fib.tot_len = 0xFFFF; /* larger than any MTU: the lookup answers FRAG_NEEDED with the route's */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), L4LB_FIB_LOOKUP_SKIP_NEIGH) != L4LB_FIB_FRAG_NEEDED)
		return 0;
	__u32 overhead = p->length == 4 ? 40 : 60;
	if (fib.mtu_result <= overhead)
		return 0;
	__u16 limit = fib.mtu_result - overhead;

	__u32 at = p->l4_off + 20, end = p->l4_off + p->l4_header;
	for (int i = 0; i < 20 && at + 1 < end; i++) {
		__u8 option[4];
		if (bpf_skb_load_bytes(skb, at, option, 2))
			return 0;
		if (option[0] == TCP_OPTION_END)
			return 0;
		if (option[0] == TCP_OPTION_NOP) {
			at += 1;
			continue;
		}
		if (option[1] < 2)
			return 0;
		if (option[0] == TCP_OPTION_MSS && option[1] == 4) {
			__be16 mss;
			if (bpf_skb_load_bytes(skb, at + 2, &mss, 2) || bpf_ntohs(mss) <= limit)
				return 0;
			__be16 clamped = bpf_htons(limit);
			if (bpf_l4_csum_replace(skb, p->csum_off, mss, clamped, 2) || bpf_skb_store_bytes(skb, at + 2, &clamped, 2, 0))
				return 0;
			count(L4LB_KR_MSS_CLAMPED);
			return 1;
		}
		at += option[1];
	}
	return 0;
}

#endif
