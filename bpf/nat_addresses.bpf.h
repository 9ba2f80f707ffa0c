/* Shared by l4lb's tc programs that rewrite addresses (udp_relay, kernel_relay): a
 * packet's old and new source and destination, laid out as bpf_csum_diff and
 * bpf_skb_store_bytes take them, and the checksum difference between the two. */
#ifndef L4LB_NAT_ADDRESSES_BPF_H
#define L4LB_NAT_ADDRESSES_BPF_H

/* Fills `old_addresses` and `new_addresses` (source then destination; IPv4 uses the
 * first 8 bytes, `length` 4, IPv6 all 32, `length` 16) and returns bpf_csum_diff's
 * difference between them, negative on failure. */
static __always_inline __s64 nat_addresses(const __u8 *old_source, const __u8 *old_destination, const __u8 *new_source,
					   const __u8 *new_destination, __u32 length, __u32 old_addresses[8], __u32 new_addresses[8])
{
	if (length == 4) {
		old_addresses[0] = *(__u32 *)old_source;
		old_addresses[1] = *(__u32 *)old_destination;
		new_addresses[0] = *(__u32 *)new_source;
		new_addresses[1] = *(__u32 *)new_destination;
	} else {
		__builtin_memcpy(old_addresses, old_source, 16);
		__builtin_memcpy(old_addresses + 4, old_destination, 16);
		__builtin_memcpy(new_addresses, new_source, 16);
		__builtin_memcpy(new_addresses + 4, new_destination, 16);
	}
	return bpf_csum_diff(old_addresses, length * 2, new_addresses, length * 2, 0);
}

#endif
