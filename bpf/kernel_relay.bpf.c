// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* l4lb's kernel forwarder (issue 35, docs/kernel-forwarding-plan.md): a tc program that
 * forwards the flows of listeners with `relay: kernel` with full NAT, for TCP and UDP over
 * IPv4 and IPv6:
 *
 *   client -> listener    becomes  l4lb (NAT port) -> endpoint
 *   endpoint -> NAT port  becomes  listener -> client
 *
 * A SYN to a service picks its endpoint from the plan user space wrote (the workers' own
 * Maglev or alias table), a NAT port, and installs both directions; a UDP session's two
 * entries are installed by its worker, with its session socket as the NAT port. Checksums are fixed incrementally (IPv4 header, the TCP/UDP pseudo-header
 * and ports; a zero IPv4 UDP checksum stays zero), the TTL or hop limit goes down by one as
 * a router's would, and each direction counts its packets, payload bytes and last
 * activity. The rewritten packet is routed by the FIB (policy rules included) and
 * redirected to the egress interface with its next hop's neighbour resolved by the kernel,
 * so it leaves without crossing this host's stack or netfilter. A SYN's or SYN-ACK's MSS is
 * clamped to the route it leaves by, and ICMP errors about a flow's packets are translated
 * back to their sender (kernel_relay_icmp.bpf.h). A packet that matches no
 * flow, and anything the parser does not follow (fragments, IPv4 options, IPv6 extension
 * headers, a TTL about to expire), goes on untouched to the next program or the stack. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "nat_addresses.bpf.h"
#include "kernel_relay.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCX_NEXT (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7
#define AF_INET 2
#define AF_INET6 10
/* Ours, not vmlinux.h's: the build machine's kernel may predate the flag (6.2). */
#define L4LB_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#define L4LB_FIB_LOOKUP_SRC (1U << 4) /* 6.7: fills in the source address the route prefers */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define NAT_PORT_PROBES 32
#define CLOSED_PORT_QUIET_NS 1000000000ULL
#define L4LB_FIB_FWD_DISABLED 5
#define L4LB_FIB_FRAG_NEEDED 8

#define IP4_TTL_OFF (ETH_HLEN + 8)
#define IP4_CSUM_OFF (ETH_HLEN + 10)
#define IP4_SRC_OFF (ETH_HLEN + 12)
#define L4_4_OFF (ETH_HLEN + 20)
#define IP6_HOP_OFF (ETH_HLEN + 7)
#define IP6_SRC_OFF (ETH_HLEN + 8)
#define L4_6_OFF (ETH_HLEN + 40)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18); /* user space sizes it */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_kr_tuple);
	__type(value, struct l4lb_kr_flow);
} kr_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L4LB_KR_COUNTER_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} kr_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L4LB_KR_LISTENERS);
	__type(key, __u32);
	__type(value, struct l4lb_kr_traffic);
} kr_listener_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L4LB_KR_ENDPOINT_SLOTS);
	__type(key, __u32);
	__type(value, struct l4lb_kr_traffic);
} kr_endpoint_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4LB_KR_LISTENERS);
	__type(key, struct l4lb_kr_service_key);
	__type(value, struct l4lb_kr_service);
} kr_services SEC(".maps");

/* Each listener's plan: an array sized by user space (BPF_F_INNER_MAP lets sizes differ),
 * swapped whole by one update of kr_plans. */
struct kr_plan {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, L4LB_KR_LISTENERS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__array(values, struct kr_plan);
} kr_plans SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_KR_ENDPOINT_SLOTS);
	__type(key, __u32);
	__type(value, struct l4lb_kr_endpoint);
} kr_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4lb_kr_settings);
} kr_settings SEC(".maps");

/* Room for what a new flow needs beyond the 512-byte stack. */
struct new_flow_scratch {
	struct bpf_fib_lookup fib;
	struct l4lb_kr_tuple reverse;
	struct l4lb_kr_tuple old_forward;
	struct l4lb_kr_flow forward_value;
	struct l4lb_kr_flow reverse_value;
	__u8 hash_bytes[40];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct new_flow_scratch);
} kr_scratch SEC(".maps");

#include "kernel_relay_select.bpf.h"

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&kr_counters, &counter);
	if (value)
		*value += 1;
}

/* Where a rewritten packet leaves: the egress interface and the next hop on it. */
struct egress {
	__u32 ifindex;
	struct bpf_redir_neigh next_hop;
};

/* Where the packet is, once parsed. */
struct parsed {
	__u32 length;       /* address length: 4 or 16 */
	__u32 address_off;  /* source address; the destination follows it */
	__u32 l4_off;
	__u32 csum_off;     /* the TCP or UDP checksum */
	__u32 payload;      /* L4 payload bytes of this skb (all its GSO segments) */
	__u32 l4_header;
	__u16 ip_total;     /* the IP packet's length as its header says (one segment's, for GSO) */
	__u8 hop;           /* TTL or hop limit as it arrived */
	__u8 tcp_flags;
	__u8 udp_csum_none; /* an IPv4 UDP packet sent without a checksum */
	__u32 seq;          /* TCP: the sequence number, host order */
	__u32 ack;          /* TCP: the acknowledgement number, host order */
};

/* The payload bytes of a TCP packet not counted before on its direction: how far it moves
 * the furthest sequence number seen. So a retransmission adds nothing, and a segment that
 * overtakes an earlier one (two CPUs) counts the bytes before it too, which the earlier one
 * then does not: the total is the sequence space the sender used, each byte once. */
static __always_inline __u32 fresh_tcp_bytes(struct l4lb_kr_flow *flow, const struct parsed *p)
{
	/* A SYN and a FIN each take a sequence number too, but carry no byte. */
	__u32 start = p->seq + ((p->tcp_flags & TCP_FLAG_SYN) ? 1 : 0);
	__u32 data_end = start + p->payload;
	__u32 end = data_end + ((p->tcp_flags & TCP_FLAG_FIN) ? 1 : 0);
	if (!(flow->state & L4LB_KR_STATE_SEQ)) {
		flow->seq_next = end;
		flow->state |= L4LB_KR_STATE_SEQ;
		return p->payload;
	}
	for (int i = 0; i < 4; i++) {
		__u32 next = flow->seq_next;
		if ((__s32)(end - next) <= 0)
			return 0;
		if (__sync_val_compare_and_swap(&flow->seq_next, next, end) == next)
			return (__s32)(data_end - next) > 0 ? data_end - next : 0;
	}
	return 0;
}

/* One packet of a kernel-started flow into its listener's and endpoint's counts. */
static __always_inline void count_traffic(const struct l4lb_kr_flow *flow, __u32 segments, __u32 payload)
{
	__u32 listener = flow->listener, endpoint = flow->endpoint;
	int reply = flow->state & L4LB_KR_STATE_REPLY;
	struct l4lb_kr_traffic *traffic[2] = {
		bpf_map_lookup_elem(&kr_listener_stats, &listener),
		endpoint == L4LB_KR_NO_SLOT ? NULL : bpf_map_lookup_elem(&kr_endpoint_stats, &endpoint),
	};
	for (int i = 0; i < 2; i++) {
		struct l4lb_kr_traffic *t = traffic[i];
		if (!t)
			continue;
		if (reply) {
			t->packets_out += segments;
			t->bytes_out += payload;
		} else {
			t->packets_in += segments;
			t->bytes_in += payload;
		}
	}
}

/* The endpoint's first answer to a kernel-started TCP flow's SYN, seen on its reply entry: a
 * SYN-ACK is a connect that worked, a RST or an ICMP error one that failed. Counted once per
 * flow for its listener and endpoint, which outlier detection reads as the proxy's connects. */
static __always_inline void count_connect(struct l4lb_kr_flow *reply, int failed)
{
	if (reply->endpoint == L4LB_KR_NO_SLOT || (reply->state & (L4LB_KR_STATE_ANSWERED | L4LB_KR_STATE_SESSION)))
		return;
	reply->state |= L4LB_KR_STATE_ANSWERED;
	__u32 listener = reply->listener, endpoint = reply->endpoint;
	struct l4lb_kr_traffic *traffic[2] = {
		bpf_map_lookup_elem(&kr_listener_stats, &listener),
		bpf_map_lookup_elem(&kr_endpoint_stats, &endpoint),
	};
	for (int i = 0; i < 2; i++) {
		struct l4lb_kr_traffic *t = traffic[i];
		if (!t)
			continue;
		if (failed)
			t->connect_failures += 1;
		else
			t->connect_successes += 1;
	}
}

/* A SYN to `listener` left to the stack (its reason counted for the table too). */
static __always_inline void count_fallback(__u32 listener, __u32 counter)
{
	count(counter);
	struct l4lb_kr_traffic *t = bpf_map_lookup_elem(&kr_listener_stats, &listener);
	if (t)
		t->fallbacks += 1;
}

/* Fills a FIB lookup from `source` to `destination` (4 or 16 bytes by `length`) as an
 * input route on the interface the packet arrived on would be looked up. */
static __always_inline void fib_between(struct bpf_fib_lookup *fib, struct __sk_buff *skb, __u32 length, const __u8 *source,
					const __u8 *destination, __u8 protocol)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->l4_protocol = protocol;
	fib->ifindex = skb->ifindex; /* on tc ingress: the interface it arrived on */
	if (length == 4) {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, source, 4);
		__builtin_memcpy(&fib->ipv4_dst, destination, 4);
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, source, 16);
		__builtin_memcpy(fib->ipv6_dst, destination, 16);
	}
}

/* Routes the packet as it will be once rewritten: the FIB lookup an input route would
 * make on the interface it arrived on (so that interface must forward, as a router's
 * must), with the neighbour left to bpf_redirect_neigh. 0, or the verdict for a packet
 * that has nowhere to go: dropped and counted, as a router would drop it (a TCP peer
 * retransmits, and the flow goes on once the route is back). */
static __always_inline int route(struct __sk_buff *skb, struct l4lb_kr_flow *flow, __u8 protocol, struct parsed *p, struct egress *out)
{
	struct bpf_fib_lookup fib;

	fib_between(&fib, skb, p->length, flow->saddr, flow->daddr, protocol);
	/* Checked against the route's MTU. A GSO skb's header gives the length of all its
	 * segments: what must fit is one segment (gso_size of payload behind the headers). */
	fib.tot_len = skb->gso_size ? p->l4_off - ETH_HLEN + p->l4_header + skb->gso_size : p->ip_total;
	fib.sport = flow->sport;
	fib.dport = flow->dport;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), L4LB_FIB_LOOKUP_SKIP_NEIGH);
	/* A datagram of a worker's UDP session too big for the route: the worker's session
	 * socket sends it, in fragments where the route needs them. */
	if (rc == L4LB_FIB_FRAG_NEEDED && (flow->state & L4LB_KR_STATE_SESSION))
		return TCX_NEXT;
	if (rc != 0) {
		count(rc == L4LB_FIB_FWD_DISABLED ? L4LB_KR_DROP_FORWARDING_OFF
		      : rc == L4LB_FIB_FRAG_NEEDED ? L4LB_KR_DROP_MTU : L4LB_KR_DROP_NO_ROUTE);
		return TC_ACT_SHOT;
	}
	/* With SKIP_NEIGH the destination fields hold the next hop: the gateway, or the
	 * destination itself on a connected route (an IPv4 route may have an IPv6 gateway). */
	out->ifindex = fib.ifindex;
	out->next_hop.nh_family = fib.family;
	if (fib.family == AF_INET)
		out->next_hop.ipv4_nh = fib.ipv4_dst;
	else
		__builtin_memcpy(out->next_hop.ipv6_nh, fib.ipv6_dst, 16);
	return 0;
}

#include "kernel_relay_icmp.bpf.h"

/* Rewrites addresses, ports and the TTL/hop limit, fixing every checksum they are part
 * of. Once a helper has changed the packet a failure leaves it half rewritten: dropped. */
static __always_inline int rewrite(struct __sk_buff *skb, struct l4lb_kr_tuple *key, struct l4lb_kr_flow *flow, struct parsed *p)
{
	__u32 old_addresses[8] = {}, new_addresses[8] = {};

	__s64 diff = nat_addresses(key->saddr, key->daddr, flow->saddr, flow->daddr, p->length, old_addresses, new_addresses);
	if (diff < 0)
		return TCX_NEXT;
	/* UDP over IPv4 may carry no checksum (0): MARK_MANGLED_0 keeps it so, and writes a
	 * sum that comes out 0 as 0xffff. TCP's is never optional. */
	__u64 l4_flags = key->protocol == PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (!p->udp_csum_none) {
		if (bpf_l4_csum_replace(skb, p->csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_flags))
			return TC_ACT_SHOT;
		if (bpf_l4_csum_replace(skb, p->csum_off, key->sport, flow->sport, 2 | l4_flags))
			return TC_ACT_SHOT;
		if (bpf_l4_csum_replace(skb, p->csum_off, key->dport, flow->dport, 2 | l4_flags))
			return TC_ACT_SHOT;
	}
	if (p->length == 4) {
		/* The header checksum covers the addresses and the TTL (the 16-bit word TTL:protocol). */
		__be16 old_word = bpf_htons((__u16)p->hop << 8 | key->protocol);
		__be16 new_word = bpf_htons((__u16)(p->hop - 1) << 8 | key->protocol);
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, 0, diff, 0))
			return TC_ACT_SHOT;
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_word, new_word, 2))
			return TC_ACT_SHOT;
		__u8 ttl = p->hop - 1;
		if (bpf_skb_store_bytes(skb, IP4_TTL_OFF, &ttl, 1, 0))
			return TC_ACT_SHOT;
	} else {
		__u8 hop = p->hop - 1;
		if (bpf_skb_store_bytes(skb, IP6_HOP_OFF, &hop, 1, 0))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, p->address_off, new_addresses, p->length * 2, 0))
		return TC_ACT_SHOT;
	__be16 ports[2] = {flow->sport, flow->dport};
	if (bpf_skb_store_bytes(skb, p->l4_off, ports, 4, BPF_F_INVALIDATE_HASH))
		return TC_ACT_SHOT;

	/* A FIN or RST lets user space expire the flow soon after, rather than at its idle
	 * timeout; bits only grow. */
	if (key->protocol == PROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))) {
		__u8 bits = (p->tcp_flags & TCP_FLAG_FIN ? L4LB_KR_STATE_FIN : 0) | (p->tcp_flags & TCP_FLAG_RST ? L4LB_KR_STATE_RST : 0);
		if ((flow->state & bits) != bits)
			flow->state |= bits;
	}
	__u32 segments = skb->gso_segs > 1 ? skb->gso_segs : 1;
	__sync_fetch_and_add(&flow->packets, segments);
	__sync_fetch_and_add(&flow->bytes, p->payload);
	/* A worker's UDP session is counted by its worker, from the entry's own counts. */
	if (!(flow->state & L4LB_KR_STATE_SESSION))
		count_traffic(flow, segments, key->protocol == PROTO_TCP ? fresh_tcp_bytes(flow, p) : p->payload);
	flow->last_ns = bpf_ktime_get_ns();
	return 0;
}

/* The key of a flow's other direction: the tuple `flow` rewrites packets to, seen from the
 * other side. */
static __always_inline void pair_key(struct l4lb_kr_tuple *out, const struct l4lb_kr_flow *flow, __u8 protocol, __u8 family)
{
	__builtin_memset(out, 0, sizeof(*out));
	__builtin_memcpy(out->saddr, flow->daddr, 16);
	__builtin_memcpy(out->daddr, flow->saddr, 16);
	out->sport = flow->dport;
	out->dport = flow->sport;
	out->protocol = protocol;
	out->family = family;
}

/* The NAT port in s->reverse is taken. By a flow that has ended (a RST, or a FIN each
 * way) and been quiet for a second? Then, as conntrack re-opens a closed connection's
 * tuple, the new flow takes it: the old pair goes and the new reply entry goes in.
 * Without this a closed flow would hold its port until the sweeper's grace ran out, and a
 * busy endpoint would run out of ports long before the table filled. The quiet second
 * lets the close finish: taken at once, the endpoint's last ACK would reach the new
 * client, whose reset would cost it a SYN retransmission (measured: the connection rate
 * halved). 1 when the new reply entry is in. */
static __always_inline int take_closed_port(struct new_flow_scratch *s)
{
	struct l4lb_kr_flow *old = bpf_map_lookup_elem(&kr_flows, &s->reverse);
	if (!old)
		return 0;
	pair_key(&s->old_forward, old, s->reverse.protocol, s->reverse.family);
	__u8 state = old->state;
	struct l4lb_kr_flow *old_forward = bpf_map_lookup_elem(&kr_flows, &s->old_forward);
	__u8 forward_state = old_forward ? old_forward->state : L4LB_KR_STATE_FIN;
	__u64 last = old->last_ns;
	if (old_forward && old_forward->last_ns > last)
		last = old_forward->last_ns;
	if (bpf_ktime_get_ns() - last < CLOSED_PORT_QUIET_NS)
		return 0;
	int closed = ((state | forward_state) & L4LB_KR_STATE_RST) || ((state & forward_state) & L4LB_KR_STATE_FIN);
	if (!closed)
		return 0;
	bpf_map_delete_elem(&kr_flows, &s->old_forward);
	bpf_map_delete_elem(&kr_flows, &s->reverse);
	if (bpf_map_update_elem(&kr_flows, &s->reverse, &s->reverse_value, BPF_NOEXIST) != 0)
		return 0;
	count(L4LB_KR_NAT_PORT_REUSED);
	return 1;
}

/* The client's ACK on a half-open kernel flow: if it acknowledges the endpoint's SYN-ACK
 * (the reply direction's seq_next), the flow is established and keeps its entries to its
 * idle timeout; a blind spoofer cannot know that number. */
static __noinline int confirm_established(struct l4lb_kr_flow *flow, struct l4lb_kr_tuple *key, __u32 ack)
{
	struct l4lb_kr_tuple reply_key;
	pair_key(&reply_key, flow, key->protocol, key->family);
	struct l4lb_kr_flow *reply = bpf_map_lookup_elem(&kr_flows, &reply_key);
	if (!reply || !(reply->state & L4LB_KR_STATE_SEQ) || reply->seq_next != ack)
		return 0;
	flow->state |= L4LB_KR_STATE_ESTABLISHED;
	return 1;
}

/* A SYN without ACK on an entry whose flow has ended (a RST, or this direction's FIN):
 * the client reuses its port for a new connection. The old pair goes, and the SYN starts
 * a new flow with a fresh choice, state and timers, as if the tuple were unknown. */
static __noinline int end_flow_for_new_syn(struct l4lb_kr_tuple *key)
{
	__u32 zero = 0;
	struct new_flow_scratch *s = bpf_map_lookup_elem(&kr_scratch, &zero);
	struct l4lb_kr_flow *old = bpf_map_lookup_elem(&kr_flows, key);
	if (!s || !old)
		return 0;
	pair_key(&s->old_forward, old, key->protocol, key->family);
	bpf_map_delete_elem(&kr_flows, &s->old_forward); /* the reply entry */
	bpf_map_delete_elem(&kr_flows, key);
	return 1;
}

/* A SYN to a service: picks its endpoint as user space would, a NAT port toward it, and
 * installs both entries of the flow. 0 when installed (or when another CPU installed the
 * same flow first, for a retransmitted SYN: its entry serves); TCX_NEXT (counted by
 * reason) when the SYN is left to the stack, where the listener's workers accept it. */
static __noinline int new_flow(struct __sk_buff *skb, struct l4lb_kr_tuple *key)
{
	struct l4lb_kr_service_key service_key;
	__u32 zero = 0;

	__builtin_memset(&service_key, 0, sizeof(service_key));
	__builtin_memcpy(service_key.addr, key->daddr, 16);
	service_key.port = key->dport;
	service_key.protocol = key->protocol;
	service_key.family = key->family;
	struct l4lb_kr_service *service = bpf_map_lookup_elem(&kr_services, &service_key);
	if (!service)
		return TCX_NEXT;
	__u32 listener = service->listener;
	if (service->flags & L4LB_KR_SERVICE_PAUSED) {
		count_fallback(listener, L4LB_KR_FALLBACK_PAUSED);
		return TCX_NEXT;
	}
	struct new_flow_scratch *s = bpf_map_lookup_elem(&kr_scratch, &zero);
	struct l4lb_kr_settings *settings = bpf_map_lookup_elem(&kr_settings, &zero);
	void *plan = bpf_map_lookup_elem(&kr_plans, &listener);
	if (!s || !settings || !plan) {
		count_fallback(listener, L4LB_KR_FALLBACK_NO_ENDPOINT);
		return TCX_NEXT;
	}

	__u32 slot;
	__u32 kind = kr_plan_word(plan, L4LB_KR_PLAN_KIND);
	if (kind == L4LB_KR_PLAN_MAGLEV)
		slot = kr_maglev_pick(plan, listener, kr_flow_hash(key, kr_plan_word(plan, L4LB_KR_PLAN_HASH_KEY), s->hash_bytes));
	else if (kind == L4LB_KR_PLAN_RANDOM)
		slot = kr_random_pick(plan, listener);
	else
		slot = L4LB_KR_PLAN_NONE;
	struct l4lb_kr_endpoint *endpoint = slot == L4LB_KR_PLAN_NONE ? NULL : bpf_map_lookup_elem(&kr_endpoints, &slot);
	if (!endpoint || endpoint->family != key->family) {
		count_fallback(listener, L4LB_KR_FALLBACK_NO_ENDPOINT);
		return TCX_NEXT;
	}

	/* The source address toward the endpoint: the one the route prefers, as the proxy's
	 * own connection would get. */
	__builtin_memset(&s->fib, 0, sizeof(s->fib));
	s->fib.l4_protocol = key->protocol;
	s->fib.dport = endpoint->port;
	s->fib.ifindex = skb->ifindex;
	if (key->family == 4) {
		s->fib.family = AF_INET;
		__builtin_memcpy(&s->fib.ipv4_dst, endpoint->addr, 4);
	} else {
		s->fib.family = AF_INET6;
		__builtin_memcpy(s->fib.ipv6_dst, endpoint->addr, 16);
	}
	if (bpf_fib_lookup(skb, &s->fib, sizeof(s->fib), L4LB_FIB_LOOKUP_SRC | L4LB_FIB_LOOKUP_SKIP_NEIGH) != 0) {
		count_fallback(listener, L4LB_KR_FALLBACK_NO_ROUTE);
		return TCX_NEXT;
	}

	/* The reply entry first, on the first free NAT port of the flow's own probe sequence:
	 * ports are per (NAT address, endpoint address and port), and hashing rather than
	 * drawing keeps a client's port the same whoever installs it. */
	__builtin_memset(&s->reverse, 0, sizeof(s->reverse));
	__builtin_memset(&s->reverse_value, 0, sizeof(s->reverse_value));
	__builtin_memset(&s->forward_value, 0, sizeof(s->forward_value));
	__builtin_memcpy(s->reverse.saddr, endpoint->addr, 16);
	if (key->family == 4)
		__builtin_memcpy(s->reverse.daddr, &s->fib.ipv4_src, 4);
	else
		__builtin_memcpy(s->reverse.daddr, s->fib.ipv6_src, 16);
	s->reverse.sport = endpoint->port;
	s->reverse.protocol = key->protocol;
	s->reverse.family = key->family;
	__builtin_memcpy(s->reverse_value.saddr, key->daddr, 16);
	__builtin_memcpy(s->reverse_value.daddr, key->saddr, 16);
	s->reverse_value.sport = key->dport;
	s->reverse_value.dport = key->sport;
	s->reverse_value.listener = (__u16)listener;
	s->reverse_value.endpoint = (__u16)slot;
	s->reverse_value.state = L4LB_KR_STATE_REPLY;
	/* Stamped now, not 0: the sweeper must not take a flow still opening for an old one. */
	s->reverse_value.last_ns = bpf_ktime_get_ns();

	__u32 first = settings->nat_port_first, ports = settings->nat_port_count;
	if (ports == 0 || first + ports > 65536) {
		count_fallback(listener, L4LB_KR_FALLBACK_NO_PORT);
		return TCX_NEXT;
	}
	__u64 h = kr_mix(kr_flow_hash(key, L4LB_KR_HASH_FIVE_TUPLE, s->hash_bytes) ^ slot);
	int installed = 0;
	for (int i = 0; i < NAT_PORT_PROBES; i++) {
		/* Each probe hashed afresh: consecutive ports would cluster (linear probing) and
		 * fail long before the range is full. */
		s->reverse.dport = bpf_htons((__u16)(first + kr_mix(h + i) % ports));
		long rc = bpf_map_update_elem(&kr_flows, &s->reverse, &s->reverse_value, BPF_NOEXIST);
		if (rc == 0) {
			installed = 1;
			break;
		}
		if (rc != -17 /* EEXIST: taken, try the next */) {
			count_fallback(listener, L4LB_KR_FALLBACK_TABLE_FULL);
			return TCX_NEXT;
		}
		if (take_closed_port(s)) {
			installed = 1;
			break;
		}
	}
	if (!installed) {
		count_fallback(listener, L4LB_KR_FALLBACK_NO_PORT);
		return TCX_NEXT;
	}
	__builtin_memcpy(s->forward_value.saddr, s->reverse.daddr, 16);
	__builtin_memcpy(s->forward_value.daddr, endpoint->addr, 16);
	s->forward_value.sport = s->reverse.dport;
	s->forward_value.dport = endpoint->port;
	s->forward_value.listener = (__u16)listener;
	s->forward_value.endpoint = (__u16)slot;
	s->forward_value.last_ns = s->reverse_value.last_ns;
	long rc = bpf_map_update_elem(&kr_flows, key, &s->forward_value, BPF_NOEXIST);
	if (rc != 0) {
		bpf_map_delete_elem(&kr_flows, &s->reverse);
		/* EEXIST: the same SYN, retransmitted, on another CPU was first; its flow
		 * carries this one too. */
		if (rc == -17)
			return 0;
		count_fallback(listener, L4LB_KR_FALLBACK_TABLE_FULL);
		return TCX_NEXT;
	}
	count(L4LB_KR_NEW_FLOWS);
	struct l4lb_kr_traffic *t = bpf_map_lookup_elem(&kr_listener_stats, &listener);
	if (t)
		t->flows += 1;
	t = bpf_map_lookup_elem(&kr_endpoint_stats, &slot);
	if (t)
		t->flows += 1;
	return 0;
}

SEC("tc")
int l4lb_kernel_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct l4lb_kr_tuple key;
	struct parsed p = {};
	__u8 protocol;

	__builtin_memset(&key, 0, sizeof(key));
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return TCX_NEXT;
		/* Options move the L4 header; fragments carry no ports (or not the whole packet);
		 * a TTL about to run out is the stack's to answer. */
		if (ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) || ip->ttl <= 1)
			return TCX_NEXT;
		protocol = ip->protocol;
		key.family = 4;
		__builtin_memcpy(key.saddr, &ip->saddr, 4);
		__builtin_memcpy(key.daddr, &ip->daddr, 4);
		p.length = 4, p.address_off = IP4_SRC_OFF, p.l4_off = L4_4_OFF, p.hop = ip->ttl;
		__u32 total = bpf_ntohs(ip->tot_len);
		p.ip_total = total;
		p.payload = total > 20 ? total - 20 : 0;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		if ((void *)(ip6 + 1) > data_end)
			return TCX_NEXT;
		/* Extension headers (a fragment header among them) are left to the stack. */
		if (ip6->hop_limit <= 1)
			return TCX_NEXT;
		protocol = ip6->nexthdr;
		key.family = 6;
		__builtin_memcpy(key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(key.daddr, &ip6->daddr, 16);
		p.length = 16, p.address_off = IP6_SRC_OFF, p.l4_off = L4_6_OFF, p.hop = ip6->hop_limit;
		p.payload = bpf_ntohs(ip6->payload_len);
		p.ip_total = p.payload + 40;
	} else {
		return TCX_NEXT;
	}
	if (protocol == PROTO_TCP) {
		struct tcphdr *tcp = data + p.l4_off;
		if ((void *)(tcp + 1) > data_end)
			return TCX_NEXT;
		key.sport = tcp->source;
		key.dport = tcp->dest;
		p.csum_off = p.l4_off + 16;
		p.l4_header = tcp->doff * 4;
		p.tcp_flags = ((__u8 *)tcp)[13];
		p.seq = bpf_ntohl(tcp->seq);
		p.ack = bpf_ntohl(tcp->ack_seq);
		p.payload = p.payload > p.l4_header ? p.payload - p.l4_header : 0;
	} else if (protocol == PROTO_UDP) {
		struct udphdr *udp = data + p.l4_off;
		if ((void *)(udp + 1) > data_end)
			return TCX_NEXT;
		key.sport = udp->source;
		key.dport = udp->dest;
		p.csum_off = p.l4_off + 6;
		p.udp_csum_none = key.family == 4 && udp->check == 0;
		p.l4_header = 8;
		p.payload = p.payload > 8 ? p.payload - 8 : 0;
	} else if ((protocol == PROTO_ICMP && key.family == 4) || (protocol == PROTO_ICMPV6 && key.family == 6)) {
		p.l4_header = 8;
		struct egress out = {};
		int verdict = translate_icmp(skb, &p, key.family, &out);
		if (verdict)
			return verdict;
		count(L4LB_KR_FORWARDED);
		return bpf_redirect_neigh(out.ifindex, &out.next_hop, sizeof(out.next_hop), 0);
	} else {
		return TCX_NEXT;
	}
	/* A GSO skb carries many segments' payload behind one header: count what it holds. */
	if (skb->gso_segs > 1)
		p.payload = skb->len > p.l4_off + p.l4_header ? skb->len - p.l4_off - p.l4_header : 0;
	key.protocol = protocol;
	struct l4lb_kr_flow *flow = bpf_map_lookup_elem(&kr_flows, &key);
	if (flow && protocol == PROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
	    (flow->state & (L4LB_KR_STATE_FIN | L4LB_KR_STATE_RST)) && end_flow_for_new_syn(&key))
		flow = NULL;
	if (!flow) {
		/* Only a SYN starts a flow here; anything else unknown is the stack's (the
		 * proxy's own connections, health checks, the host's traffic). A UDP flow is
		 * installed by the worker whose session it is, after the session's first
		 * datagram: its session socket is the NAT port, so a reply too big for one
		 * packet (fragments, reassembled by the stack after tc) reaches that socket and
		 * the worker relays it. */
		if (protocol != PROTO_TCP || (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return TCX_NEXT;
		if (new_flow(skb, &key) != 0)
			return TCX_NEXT;
		flow = bpf_map_lookup_elem(&kr_flows, &key);
		if (!flow)
			return TCX_NEXT;
	}
	if (protocol == PROTO_TCP && !(flow->state & (L4LB_KR_STATE_REPLY | L4LB_KR_STATE_ESTABLISHED)) &&
	    flow->endpoint != L4LB_KR_NO_SLOT && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_ACK)
		confirm_established(flow, &key, p.ack);
	struct egress out = {};
	int verdict = route(skb, flow, protocol, &p, &out);
	if (verdict)
		return verdict;
	if (protocol == PROTO_TCP && (flow->state & L4LB_KR_STATE_REPLY) && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST)))
		count_connect(flow, p.tcp_flags & TCP_FLAG_RST);
	if (protocol == PROTO_TCP && (p.tcp_flags & TCP_FLAG_SYN))
		clamp_mss(skb, &key, &p);
	verdict = rewrite(skb, &key, flow, &p);
	if (verdict)
		return verdict;
	count(L4LB_KR_FORWARDED);
	return bpf_redirect_neigh(out.ifindex, &out.next_hop, sizeof(out.next_hop), 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
