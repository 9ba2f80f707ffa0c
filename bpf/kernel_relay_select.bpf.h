/* The kernel forwarder's endpoint choice for a new flow (issue 35, step 4), the same as
 * user space's: StableHash over the bytes FlowHash hashes, MaglevTable.lookup's probe
 * rule and fallback scan, AliasTable.pick for random. A plan is an inner array of u32
 * words (kernel_relay.h) that user space writes from the snapshot; an endpoint is
 * available when kr_endpoints says so (EndpointStatus's flags) and its weight is not 0.
 * Included by kernel_relay.bpf.c only, after its maps. */
#ifndef L4LB_KERNEL_RELAY_SELECT_BPF_H
#define L4LB_KERNEL_RELAY_SELECT_BPF_H

/* StableHash.mix: SplitMix64's finalizer. */
static __always_inline __u64 kr_mix(__u64 z)
{
	z += 0x9E3779B97F4A7C15ULL;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* StableHash.hash(bytes, seed: 0): FNV-1a 64, then mix. At most 40 bytes. */
static __always_inline __u64 kr_stable_hash(const __u8 *bytes, __u32 length)
{
	__u64 h = 0xCBF29CE484222325ULL;
	for (__u32 i = 0; i < 40; i++) {
		if (i >= length)
			break;
		h ^= bytes[i];
		h *= 0x100000001B3ULL;
	}
	return kr_mix(h);
}

/* FlowHash.compute(client:key:) for a SYN as it arrived: the client's address, then its
 * port, then (five_tuple) the listener's address and port and the protocol, each in
 * network order. `bytes` has room for 40. */
static __always_inline __u64 kr_flow_hash(const struct l4lb_kr_tuple *key, __u32 hash_key, __u8 *bytes)
{
	__u32 length;
	if (key->family == 4) {
		__builtin_memcpy(bytes, key->saddr, 4);
		__builtin_memcpy(bytes + 4, &key->sport, 2);
		__builtin_memcpy(bytes + 6, key->daddr, 4);
		__builtin_memcpy(bytes + 10, &key->dport, 2);
		bytes[12] = PROTO_TCP;
		length = hash_key == L4LB_KR_HASH_SOURCE_IP ? 4 : hash_key == L4LB_KR_HASH_SOURCE_IP_PORT ? 6 : 13;
	} else {
		__builtin_memcpy(bytes, key->saddr, 16);
		__builtin_memcpy(bytes + 16, &key->sport, 2);
		__builtin_memcpy(bytes + 18, key->daddr, 16);
		__builtin_memcpy(bytes + 34, &key->dport, 2);
		bytes[36] = PROTO_TCP;
		length = hash_key == L4LB_KR_HASH_SOURCE_IP ? 16 : hash_key == L4LB_KR_HASH_SOURCE_IP_PORT ? 18 : 37;
	}
	return kr_stable_hash(bytes, length);
}

/* One word of a plan; NONE past its end. */
static __always_inline __u32 kr_plan_word(void *plan, __u32 index)
{
	__u32 *word = bpf_map_lookup_elem(plan, &index);
	return word ? *word : L4LB_KR_PLAN_NONE;
}

/* Whether an endpoint slot may take a new flow. */
static __always_inline int kr_available(__u32 slot)
{
	if (slot & L4LB_KR_PLAN_WEIGHT_ZERO)
		return 0; /* NONE, or weight 0 */
	struct l4lb_kr_endpoint *endpoint = bpf_map_lookup_elem(&kr_endpoints, &slot);
	return endpoint && endpoint->unavailable == 0;
}

/* The scan over a cluster's endpoints in config order that both balancers fall back to:
 * from `start`, the first available one. Run by bpf_loop (n can be 65,535). */
struct kr_scan {
	__u32 listener;
	__u32 list;  /* word index of the endpoint list */
	__u32 count;
	__u32 start;
	__u32 found;
};

static long kr_scan_step(__u32 k, struct kr_scan *scan)
{
	void *plan = bpf_map_lookup_elem(&kr_plans, &scan->listener);
	if (!plan || scan->count == 0)
		return 1;
	__u32 position = scan->start + k;
	if (position >= scan->count)
		position -= scan->count;
	__u32 slot = kr_plan_word(plan, scan->list + position);
	if (kr_available(slot)) {
		scan->found = slot;
		return 1;
	}
	return 0;
}

static __always_inline __u32 kr_scan(__u32 listener, __u32 list, __u32 count, __u32 start)
{
	struct kr_scan scan = {.listener = listener, .list = list, .count = count, .start = start, .found = L4LB_KR_PLAN_NONE};
	if (count == 0)
		return L4LB_KR_PLAN_NONE;
	bpf_loop(count, kr_scan_step, &scan, 0);
	return scan.found;
}

/* MaglevTable.lookup(key, attempts: 64): the key's probe sequence through the table, then
 * the scan from key % n. Returns an endpoint slot or NONE. */
static __always_inline __u32 kr_maglev_pick(void *plan, __u32 listener, __u64 key)
{
	__u64 m = kr_plan_word(plan, L4LB_KR_PLAN_SIZE);
	__u32 n = kr_plan_word(plan, L4LB_KR_PLAN_COUNT);
	if (m < 2 || m >= L4LB_KR_PLAN_NONE - L4LB_KR_PLAN_HEADER || n == 0 || n >= L4LB_KR_PLAN_NONE)
		return L4LB_KR_PLAN_NONE;
	__u64 slot = key % m;
	__u64 step = (key >> 32) % (m - 1) + 1;
	for (int i = 0; i < 64; i++) {
		__u32 endpoint = kr_plan_word(plan, L4LB_KR_PLAN_HEADER + (__u32)slot);
		if (kr_available(endpoint))
			return endpoint;
		slot += step;
		if (slot >= m)
			slot -= m;
	}
	return kr_scan(listener, L4LB_KR_PLAN_HEADER + (__u32)m, n, (__u32)(key % n));
}

/* WeightedRandom.pick: eight draws from the alias table, then the scan from a random
 * start. No agreement with another instance is owed, only the weights. */
static __always_inline __u32 kr_random_pick(void *plan, __u32 listener)
{
	__u32 n = kr_plan_word(plan, L4LB_KR_PLAN_COUNT);
	if (n == 0 || n > 0xFFFF)
		return L4LB_KR_PLAN_NONE;
	__u32 list = L4LB_KR_PLAN_HEADER + 2 * n;
	for (int i = 0; i < 8; i++) {
		__u64 r = (__u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32();
		__u32 column = ((r >> 32) * n) >> 32;
		__u32 keep = kr_plan_word(plan, L4LB_KR_PLAN_HEADER + column);
		__u32 index = (__u32)r < keep ? column : kr_plan_word(plan, L4LB_KR_PLAN_HEADER + n + column);
		if (index >= n)
			continue;
		__u32 endpoint = kr_plan_word(plan, list + index);
		if (kr_available(endpoint))
			return endpoint;
	}
	return kr_scan(listener, list, n, bpf_get_prandom_u32() % n);
}

#endif
