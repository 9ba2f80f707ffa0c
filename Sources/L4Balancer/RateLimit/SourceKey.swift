import BPFSteer

/// What a rate limit counts by: a listener and a source prefix (the client's address
/// masked to `prefix_v4` / `prefix_v6`).
public struct SourceKey: Equatable, Sendable {
    /// The masked address (IPv4: in the low 32 bits of `low`).
    var high: UInt64
    var low: UInt64
    /// listener identity << 16 | family (4 or 6) << 8 | prefix length.
    var meta: UInt64

    public init(high: UInt64, low: UInt64, meta: UInt64) {
        self.high = high
        self.low = low
        self.meta = meta
    }

    init(_ address: SourceAddress, listener: Int, prefixV4: Int, prefixV6: Int) {
        let length = address.isV4 ? prefixV4 : prefixV6
        (high, low) = address.masked(length)
        meta = UInt64(listener) << 16 | UInt64(address.isV4 ? 4 : 6) << 8 | UInt64(length)
    }

    var listener: Int { Int(meta >> 16 & 0xFFFF) }
    var isV4: Bool { meta >> 8 & 0xFF == 4 }
    var prefixLength: Int { Int(meta & 0xFF) }

    @inline(__always)
    var hash: UInt64 { StableHash.mix(high ^ StableHash.mix(low ^ StableHash.mix(meta))) }

    /// `192.0.2.0/24`, `2001:db8::/64` (a /32 or /128 without the length).
    var prefix: SourcePrefix {
        let bytes: [UInt8]
        if isV4 {
            bytes = (0..<4).map { UInt8(truncatingIfNeeded: low >> (24 - 8 * $0)) }
        } else {
            bytes = (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * $0)) } + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * $0)) }
        }
        return SourcePrefix(family: isV4 ? .v4 : .v6, bytes: bytes, length: prefixLength)
    }
}
