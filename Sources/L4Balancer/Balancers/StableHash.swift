/// The one hash every balancer uses, fixed so that every l4lb instance (and every run)
/// computes the same values: FNV-1a 64 over the bytes, then SplitMix64's finalizer for
/// avalanche. Not Swift's `Hasher`, which is seeded per process.
public enum StableHash {
    @inlinable
    public static func hash<Bytes: Sequence>(_ bytes: Bytes, seed: UInt64 = 0) -> UInt64 where Bytes.Element == UInt8 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325 ^ seed
        for byte in bytes {
            h ^= UInt64(byte)
            h &*= 0x0000_0100_0000_01B3
        }
        return mix(h)
    }

    /// SplitMix64's finalizer.
    @inlinable
    public static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// An endpoint's identity for hashing: its address as written (`10.0.0.1:80`,
    /// `[2001:db8::1]:80`), so position in the config does not matter.
    public static func endpoint(_ address: SocketAddress, seed: UInt64) -> UInt64 {
        hash(address.description.utf8, seed: seed)
    }
}

/// A small, fast, deterministic PRNG (xorshift64*) for random and least-request picks;
/// one per worker per cluster.
public struct FastRandom {
    @usableFromInline var state: UInt64

    public init(seed: UInt64) { state = StableHash.mix(seed) | 1 }

    @inlinable
    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }

    /// Uniform in `0..<bound` (Lemire's multiply-shift; bias negligible for our bounds).
    @inlinable
    public mutating func next(below bound: Int) -> Int {
        Int(truncatingIfNeeded: (UInt64(truncatingIfNeeded: next() >> 32) &* UInt64(bound)) >> 32)
    }
}
