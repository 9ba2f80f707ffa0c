/// Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weighted fill.
///
/// Each endpoint has a preference permutation of the table's slots: `offset = h0 % M`,
/// `skip = h1 % (M - 1) + 1`, slot `j` of its permutation is `(offset + j × skip) % M`,
/// with `h0`, `h1` = `StableHash.endpoint(address, seed: 0 / 1)`. Endpoints are sorted by
/// address before filling, so the order in the config does not matter. Filling goes round
/// after round; in each round an endpoint earns credit equal to its weight and claims its
/// next free preferred slot for every `maxWeight` of credit, so slots end up in proportion
/// to weights. `M` must be prime (65537 by default). Built by the control plane.
public struct MaglevTable: Sendable {
    public static let defaultSize = 65537

    /// Endpoint index (into the cluster's endpoints as listed in the config) per slot.
    public let slots: [Int32]
    public var size: Int { slots.count }
    /// Endpoints in the config's order (weight 0 ones included), for the fallback scan.
    public let endpointCount: Int

    public init(endpoints: [(address: SocketAddress, weight: Int)], size: Int = MaglevTable.defaultSize) {
        precondition(MaglevTable.isPrime(size), "Maglev table size must be prime")
        let m = UInt64(size)
        // Sorted by address; `order[k]` is the config index of the k-th endpoint.
        let order = endpoints.indices.filter { endpoints[$0].weight > 0 }
            .sorted { endpoints[$0].address.description < endpoints[$1].address.description }
        var table = [Int32](repeating: -1, count: size)
        endpointCount = endpoints.count
        guard !order.isEmpty else {
            slots = table
            return
        }
        let offsets = order.map { StableHash.endpoint(endpoints[$0].address, seed: 0) % m }
        let skips = order.map { StableHash.endpoint(endpoints[$0].address, seed: 1) % (m - 1) + 1 }
        let weights = order.map { endpoints[$0].weight }
        let maxWeight = weights.max()!
        var next = [UInt64](repeating: 0, count: order.count)  // position in each permutation
        var credit = [Int](repeating: 0, count: order.count)
        var filled = 0
        while filled < size {
            for k in order.indices where filled < size {
                credit[k] += weights[k]
                while credit[k] >= maxWeight, filled < size {
                    credit[k] -= maxWeight
                    var slot = (offsets[k] &+ next[k] &* skips[k]) % m
                    while table[Int(slot)] >= 0 {
                        next[k] += 1
                        slot = (offsets[k] &+ next[k] &* skips[k]) % m
                    }
                    table[Int(slot)] = Int32(order[k])
                    next[k] += 1
                    filled += 1
                }
            }
        }
        slots = table
    }

    /// The endpoint for a key hash, walking on through the key's own probe sequence while
    /// `available(index)` is false (an endpoint that is unhealthy, draining, or already
    /// tried). Keys whose endpoint is available never move. When most of the cluster is
    /// out, the probe sequence can miss the few left; after `attempts` probes the key scans
    /// the endpoints from a place its hash decides, so it never gives up while one is
    /// available (and keys still spread over those left).
    @inlinable
    public func lookup(_ key: UInt64, attempts: Int = 64, available: (Int) -> Bool) -> Int? {
        let m = UInt64(slots.count)
        var slot = key % m
        let step = (key >> 32) % (m - 1) + 1
        for _ in 0..<attempts {
            let endpoint = Int(slots[Int(slot)])
            if endpoint >= 0, available(endpoint) { return endpoint }
            slot = (slot &+ step) % m
        }
        guard endpointCount > 0 else { return nil }
        let start = Int(key % UInt64(endpointCount))
        for k in 0..<endpointCount {
            let endpoint = (start + k) % endpointCount
            if available(endpoint) { return endpoint }
        }
        return nil
    }

    public static func isPrime(_ n: Int) -> Bool {
        if n < 2 { return false }
        if n < 4 { return true }
        if n % 2 == 0 { return false }
        var d = 3
        while d * d <= n {
            if n % d == 0 { return false }
            d += 2
        }
        return true
    }
}
