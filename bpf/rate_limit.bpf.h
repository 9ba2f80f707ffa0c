// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Per-source rate limits in XDP, for the listeners user space hands over (rate_rules):
 * a new TCP connection is a SYN without ACK, a new UDP flow a datagram from a source
 * address and port not seen within the listener's idle_timeout, and every UDP datagram
 * is a packet. Each source prefix has GCRA buckets (one word per limit, moved on with a
 * compare-and-swap, so every CPU shares one budget) in an LRU map whose size user space
 * sets from rate_limit.table_size. Over a limit the packet is dropped, counted per
 * interface (by reason) and per listener. Included by xdp_filter.bpf.c only. */
#ifndef L4LB_RATE_LIMIT_BPF_H
#define L4LB_RATE_LIMIT_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4LB_MAX_RATE_RULES);
	__type(key, struct l4lb_rate_listener);
	__type(value, struct l4lb_rate_rule);
} rate_rules SEC(".maps");

/* Sized by user space before loading (rate_limit.table_size). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct l4lb_rate_bucket_key);
	__type(value, struct l4lb_rate_bucket);
} rate_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct l4lb_rate_flow_key);
	__type(value, __u64);
} rate_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_RATE_EXEMPT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_rate_exempt_v4);
	__type(value, __u8);
} rate_exempt_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4LB_MAX_RATE_EXEMPT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4lb_rate_exempt_v6);
	__type(value, __u8);
} rate_exempt_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, L4LB_MAX_RATE_RULES);
	__type(key, __u32);
	__type(value, struct l4lb_rate_counters);
} rate_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4lb_rate_table);
} rate_table SEC(".maps");

/* GCRA: takes one unit; 0 when the bucket runs more than `tolerance` ahead of now. */
static __always_inline int gcra_take(__u64 *tat, __u64 interval, __u64 tolerance, __u64 now)
{
	__u64 due = *(volatile __u64 *)tat;
#pragma unroll
	for (int attempt = 0; attempt < 4; attempt++) {
		__u64 next = (due > now ? due : now) + interval;
		if (next - now > tolerance)
			return 0;
		__u64 seen = __sync_val_compare_and_swap(tat, due, next);
		if (seen == due)
			return 1;
		due = seen;
	}
	/* Four CPUs raced this source's bucket and every one won before us: a flood. */
	return 0;
}

static __always_inline struct l4lb_rate_rule *rate_rule(int family, const void *daddr, __be16 port, __u8 protocol)
{
	struct l4lb_rate_listener key = { .port = port, .protocol = protocol, .family = family };
	if (family == 4)
		__builtin_memcpy(key.addr, daddr, 4);
	else
		__builtin_memcpy(key.addr, daddr, 16);
	struct l4lb_rate_rule *rule = bpf_map_lookup_elem(&rate_rules, &key);
	if (rule)
		return rule;
	__builtin_memset(key.addr, 0, sizeof(key.addr));
	return bpf_map_lookup_elem(&rate_rules, &key);
}

static __always_inline int rate_exempt(__u32 id, int family, const void *saddr)
{
	if (family == 4) {
		struct l4lb_rate_exempt_v4 key = { .prefixlen = 64, .id = id };
		__builtin_memcpy(key.addr, saddr, 4);
		return bpf_map_lookup_elem(&rate_exempt_v4, &key) != NULL;
	}
	struct l4lb_rate_exempt_v6 key = { .prefixlen = 160, .id = id };
	__builtin_memcpy(key.addr, saddr, 16);
	return bpf_map_lookup_elem(&rate_exempt_v6, &key) != NULL;
}

/* One 32-bit word of an address masked to the first `bits` of a prefix (any value). */
static __always_inline __u32 masked_word(__u32 word, int bits)
{
	if (bits <= 0)
		return 0;
	if (bits >= 32)
		return word;
	return word & bpf_htonl(0xFFFFFFFFu << (32 - bits));
}

static __always_inline void rate_count(__u32 id, int which)
{
	struct l4lb_rate_counters *c = bpf_map_lookup_elem(&rate_counters, &id);
	if (!c)
		return;
	if (which == 0)
		c->new_connections++;
	else if (which == 1)
		c->packets++;
	else
		c->exempt++;
}

static __always_inline void rate_table_count(int flows)
{
	__u32 zero = 0;
	struct l4lb_rate_table *t = bpf_map_lookup_elem(&rate_table, &zero);
	if (!t)
		return;
	if (flows)
		t->flow_inserts++;
	else
		t->bucket_inserts++;
}

/* The source's bucket, inserted (full) when it has none. */
static __always_inline struct l4lb_rate_bucket *rate_bucket(const struct l4lb_rate_rule *rule, int family, const void *saddr)
{
	struct l4lb_rate_bucket_key key = { .id = rule->id, .family = family };
	__u32 words[4] = {};
	if (family == 4) {
		__builtin_memcpy(words, saddr, 4);
		key.prefix = rule->prefix_v4;
		words[0] = masked_word(words[0], key.prefix);
	} else {
		__builtin_memcpy(words, saddr, 16);
		key.prefix = rule->prefix_v6;
#pragma unroll
		for (int i = 0; i < 4; i++)
			words[i] = masked_word(words[i], (int)key.prefix - 32 * i);
	}
	__builtin_memcpy(key.addr, words, 16);
	struct l4lb_rate_bucket *bucket = bpf_map_lookup_elem(&rate_buckets, &key);
	if (bucket)
		return bucket;
	struct l4lb_rate_bucket fresh = {};
	if (bpf_map_update_elem(&rate_buckets, &key, &fresh, BPF_NOEXIST) == 0)
		rate_table_count(0);
	return bpf_map_lookup_elem(&rate_buckets, &key);
}

/* The UDP flow's key; 1 when it was not seen within the listener's idle time. */
static __always_inline int udp_flow_is_new(const struct l4lb_rate_rule *rule, struct l4lb_rate_flow_key *key, __u64 now)
{
	__u64 *seen = bpf_map_lookup_elem(&rate_flows, key);
	if (!seen || now - *seen > rule->flow_idle_ns)
		return 1;
	*seen = now;
	return 0;
}

static __always_inline void udp_flow_admitted(struct l4lb_rate_flow_key *key, __u64 now)
{
	__u64 *seen = bpf_map_lookup_elem(&rate_flows, key);
	if (seen) {
		*seen = now;
		return;
	}
	if (bpf_map_update_elem(&rate_flows, key, &now, BPF_ANY) == 0)
		rate_table_count(1);
}

static __always_inline int rate_rules_exist(void)
{
	__u32 zero = 0;
	struct l4lb_settings *s = bpf_map_lookup_elem(&settings, &zero);
	return s && s->rate_rules > 0;
}

/* The rate-limit verdict for a TCP or UDP packet whose port pair at `l4` was checked to
 * be in bounds: -1 when it passes, else the drop reason. */
static __always_inline int rate_limit(int family, const void *saddr, const void *daddr, void *l4, void *data_end, __u8 protocol)
{
	if (!rate_rules_exist())
		return -1;
	__be16 *port_pair = l4;
	if (protocol == NEXTHDR_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		if (!tcp->syn || tcp->ack)
			return -1;
	}
	struct l4lb_rate_rule *rule = rate_rule(family, daddr, port_pair[1], protocol);
	if (!rule)
		return -1;
	int connection = rule->connection_interval > 0;
	int packet = protocol == NEXTHDR_UDP && rule->packet_interval > 0;
	if (protocol == NEXTHDR_UDP && !rule->udp_flows)
		connection = 0;
	if (!connection && !packet)
		return -1;
	if (rate_exempt(rule->id, family, saddr)) {
		rate_count(rule->id, 2);
		return -1;
	}
	__u64 now = bpf_ktime_get_ns();
	struct l4lb_rate_flow_key flow = { .id = rule->id, .port = port_pair[0], .family = family };
	if (protocol == NEXTHDR_UDP && connection) {
		if (family == 4)
			__builtin_memcpy(flow.addr, saddr, 4);
		else
			__builtin_memcpy(flow.addr, saddr, 16);
		connection = udp_flow_is_new(rule, &flow, now);
		if (!connection && !packet)
			return -1;
	}
	struct l4lb_rate_bucket *bucket = rate_bucket(rule, family, saddr);
	if (!bucket)
		return -1; /* the LRU could not give a slot: degrade open, as user space does */
	if (packet && !gcra_take(&bucket->packet_tat, rule->packet_interval, rule->packet_tolerance, now)) {
		rate_count(rule->id, 1);
		return L4LB_DROP_RATE_PACKETS;
	}
	if (connection) {
		if (!gcra_take(&bucket->connection_tat, rule->connection_interval, rule->connection_tolerance, now)) {
			rate_count(rule->id, 0);
			return L4LB_DROP_RATE_NEW_CONNECTIONS;
		}
		if (protocol == NEXTHDR_UDP)
			udp_flow_admitted(&flow, now);
	}
	return -1;
}

#endif
