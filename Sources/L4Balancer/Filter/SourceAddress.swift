import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// A client's IP address as the filter and the rate limits see it, read in place from a
/// `sockaddr_in` / `sockaddr_in6` (a datagram's sender, or an accepted socket's peer). An
/// IPv4 client of a dual-stack listener (`::ffff:a.b.c.d`) is an IPv4 source.
struct SourceAddress {
    let isV4: Bool
    /// IPv4: 0. IPv6: the first 64 bits, host order.
    let high: UInt64
    /// IPv4: the address in the low 32 bits. IPv6: the last 64 bits, host order.
    let low: UInt64

    init?(_ raw: UnsafeRawPointer) {
        switch Int32(raw.load(as: sa_family_t.self)) {
        case AF_INET:
            isV4 = true
            high = 0
            low = UInt64(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        case AF_INET6:
            let h = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            let l = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
            if h == 0, l >> 32 == 0xFFFF {
                isV4 = true
                high = 0
                low = l & 0xFFFF_FFFF
            } else {
                isV4 = false
                high = h
                low = l
            }
        default:
            return nil
        }
    }

    var v4: UInt32 { UInt32(truncatingIfNeeded: low) }
    var v6: PrefixSet.V6 { PrefixSet.V6(high: high, low: low) }

    /// The address with all but its first `length` bits cleared (IPv4: of 32, IPv6: of 128).
    func masked(_ length: Int) -> (high: UInt64, low: UInt64) {
        if isV4 { return (0, UInt64(PrefixSet.maskV4(v4, length))) }
        let m = v6.masked(length)
        return (m.high, m.low)
    }
}

/// Source prefixes grouped by length, so a lookup is one hash probe per distinct length in
/// use (at most 33 for IPv4, 129 for IPv6). Immutable.
struct PrefixSet {
    struct V6: Hashable {
        var high: UInt64
        var low: UInt64

        func masked(_ length: Int) -> V6 {
            func mask(_ bits: Int) -> UInt64 { bits <= 0 ? 0 : bits >= 64 ? ~0 : ~0 << (64 - bits) }
            return V6(high: high & mask(length), low: low & mask(length - 64))
        }
    }

    private let v4Groups: [(length: Int, addresses: Set<UInt32>)]
    private let v6Groups: [(length: Int, addresses: Set<V6>)]

    var isEmpty: Bool { v4Groups.isEmpty && v6Groups.isEmpty }

    init(_ prefixes: [SourcePrefix]) {
        v4Groups = Dictionary(grouping: prefixes.filter { $0.family == .v4 }, by: \.length)
            .map { length, group in (length, Set(group.map { PrefixSet.v4Key($0.bytes) })) }
            .sorted { $0.length > $1.length }
        v6Groups = Dictionary(grouping: prefixes.filter { $0.family == .v6 }, by: \.length)
            .map { length, group in (length, Set(group.map { PrefixSet.v6Key($0.bytes) })) }
            .sorted { $0.length > $1.length }
    }

    func contains(_ address: SourceAddress) -> Bool {
        address.isV4 ? contains(v4: address.v4) : contains(v6: address.v6)
    }

    func contains(v4 address: UInt32) -> Bool {
        for group in v4Groups where group.addresses.contains(PrefixSet.maskV4(address, group.length)) { return true }
        return false
    }

    func contains(v6 address: V6) -> Bool {
        for group in v6Groups where group.addresses.contains(address.masked(group.length)) { return true }
        return false
    }

    @inline(__always)
    static func maskV4(_ address: UInt32, _ length: Int) -> UInt32 {
        length <= 0 ? 0 : length >= 32 ? address : address & ~0 << (32 - length)
    }

    static func v4Key(_ bytes: [UInt8]) -> UInt32 {
        bytes.reduce(0) { $0 << 8 | UInt32($1) }
    }

    static func v6Key(_ bytes: [UInt8]) -> V6 {
        V6(high: bytes[0..<8].reduce(0) { $0 << 8 | UInt64($1) }, low: bytes[8..<16].reduce(0) { $0 << 8 | UInt64($1) })
    }
}
