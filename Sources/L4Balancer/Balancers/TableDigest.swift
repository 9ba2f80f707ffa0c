/// A short fingerprint of the hash tables a snapshot built, over endpoint addresses rather
/// than config positions: equal on every l4lb instance that will route keys alike.
/// `l4lb check --show-tables` prints it, so a fleet behind ECMP can be compared.
extension Snapshot.ClusterPlan {
    public func tableDigest(endpoints: [Snapshot.EndpointPlan]) -> String? {
        let names = endpoints[firstEndpoint..<(firstEndpoint + endpointCount)].map { StableHash.endpoint($0.address, seed: 2) }
        var digest: UInt64 = 0
        if let table = maglevTable {
            for slot in table.slots { digest = StableHash.mix(digest ^ (slot >= 0 ? names[Int(slot)] : 0)) }
            return "maglev table_size=\(table.size) digest=\(hex(digest))"
        }
        if let ring = hashRing {
            for (hash, owner) in zip(ring.hashes, ring.owners) { digest = StableHash.mix(digest ^ hash ^ names[Int(owner)]) }
            return "ring_hash points=\(ring.hashes.count) digest=\(hex(digest))"
        }
        return nil
    }

    private func hex(_ value: UInt64) -> String {
        let text = String(value, radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }
}
