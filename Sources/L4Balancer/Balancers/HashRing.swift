/// A consistent hash ring (Karger et al.; Envoy's `ring_hash`). Each endpoint is placed at
/// `points_i = round(R × w_i / Σw)` positions `StableHash(address + "_" + n)`, with
/// `R = clamp(minimumRingSize × Σw / min(w), …, 2^23)`: the smallest weight gets about
/// `minimumRingSize` points. A key goes to the first point clockwise from its hash
/// (binary search, O(log R)). With a balance factor (Envoy's `hash_balance_factor`,
/// "consistent hashing with bounded loads"), the walk skips endpoints already holding
/// more than `factor × average` connections.
public struct HashRing: Sendable {
    public static let defaultMinimumRingSize = 1024
    public static let maximumRingSize = 1 << 23

    /// Sorted point hashes, and the endpoint index (as listed in the config) of each.
    public let hashes: [UInt64]
    public let owners: [Int32]

    public init(endpoints: [(address: SocketAddress, weight: Int)], minimumRingSize: Int = HashRing.defaultMinimumRingSize) {
        let weighted = endpoints.indices.filter { endpoints[$0].weight > 0 }
        guard !weighted.isEmpty else {
            hashes = []
            owners = []
            return
        }
        let total = weighted.reduce(0) { $0 + endpoints[$1].weight }
        let smallest = weighted.map { endpoints[$0].weight }.min()!
        let ringSize = min(HashRing.maximumRingSize, max(minimumRingSize, minimumRingSize * (total / smallest)))
        var points: [(UInt64, Int32)] = []
        points.reserveCapacity(ringSize + weighted.count)
        for i in weighted {
            let count = max(1, Int((Double(ringSize) * Double(endpoints[i].weight) / Double(total)).rounded()))
            let name = endpoints[i].address.description
            for n in 0..<count {
                points.append((StableHash.hash("\(name)_\(n)".utf8), Int32(i)))
            }
        }
        points.sort { $0.0 < $1.0 || ($0.0 == $1.0 && $0.1 < $1.1) }
        hashes = points.map(\.0)
        owners = points.map(\.1)
    }

    public var isEmpty: Bool { hashes.isEmpty }

    /// Index of the first point at or after `key` (wrapping).
    @inlinable
    public func firstPoint(atOrAfter key: UInt64) -> Int {
        var low = 0
        var high = hashes.count
        while low < high {
            let mid = (low + high) >> 1
            if hashes[mid] < key { low = mid + 1 } else { high = mid }
        }
        return low == hashes.count ? 0 : low
    }

    /// The endpoint for `key`: the first point clockwise whose endpoint `accept`s.
    /// Gives up after a full turn or `limit` points.
    @inlinable
    public func lookup(_ key: UInt64, limit: Int = .max, accept: (Int) -> Bool) -> Int? {
        guard !hashes.isEmpty else { return nil }
        var index = firstPoint(atOrAfter: key)
        for _ in 0..<min(limit, hashes.count) {
            let endpoint = Int(owners[index])
            if accept(endpoint) { return endpoint }
            index += 1
            if index == hashes.count { index = 0 }
        }
        return nil
    }
}
