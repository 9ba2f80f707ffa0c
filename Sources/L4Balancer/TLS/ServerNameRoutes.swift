/// A listener's `routes`: server names (exact, or `*.suffix` for one more label) → the
/// route (its position in `routes`, for its hit count) and its cluster's position in the
/// snapshot. Looked up with the name's bytes where the
/// ClientHello holds them, by a case-folded hash: no String per connection.
public struct ServerNameRoutes {
    private var exact: [UInt64: [(name: [UInt8], route: Int)]] = [:]
    private var wildcard: [UInt64: [(suffix: [UInt8], route: Int)]] = [:]
    /// Per route: its cluster.
    public let clusters: [Int]
    public let defaultCluster: Int

    public init(routes: [(serverNames: [String], cluster: Int)], defaultCluster: Int) {
        self.defaultCluster = defaultCluster
        clusters = routes.map(\.cluster)
        for (index, route) in routes.enumerated() {
            for name in route.serverNames {
                let folded = Array(name.lowercased().utf8)
                if folded.starts(with: Array("*.".utf8)) {
                    let suffix = Array(folded.dropFirst(2))
                    let key = suffix.withUnsafeBytes { ServerNameRoutes.hash($0, 0, $0.count) }
                    if wildcard[key, default: []].contains(where: { $0.suffix == suffix }) { continue }
                    wildcard[key, default: []].append((suffix, index))
                } else {
                    let key = folded.withUnsafeBytes { ServerNameRoutes.hash($0, 0, $0.count) }
                    if exact[key, default: []].contains(where: { $0.name == folded }) { continue }
                    exact[key, default: []].append((folded, index))
                }
            }
        }
    }

    /// The cluster for the name at `offset..<offset+length` of `bytes`, or nil (use the
    /// default).
    public func cluster(for bytes: UnsafeRawBufferPointer, offset: Int, length: Int) -> Int? {
        route(for: bytes, offset: offset, length: length).map { clusters[$0] }
    }

    /// The route for the name at `offset..<offset+length` of `bytes`, or nil: an exact
    /// name first, then a wildcard.
    public func route(for bytes: UnsafeRawBufferPointer, offset: Int, length: Int) -> Int? {
        if let entries = exact[ServerNameRoutes.hash(bytes, offset, length)] {
            for entry in entries where ServerNameRoutes.equal(bytes, offset, length, entry.name) { return entry.route }
        }
        // "*.example.test" matches "a.example.test": the part after the first label.
        var dot = offset
        while dot < offset + length, bytes[dot] != 0x2E { dot += 1 }
        guard dot > offset, dot < offset + length - 1 else { return nil }
        let start = dot + 1
        let rest = offset + length - start
        if let entries = wildcard[ServerNameRoutes.hash(bytes, start, rest)] {
            for entry in entries where ServerNameRoutes.equal(bytes, start, rest, entry.suffix) { return entry.route }
        }
        return nil
    }

    @inline(__always)
    static func fold(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c | 0x20 : c }

    /// FNV-1a over the case-folded bytes.
    static func hash(_ bytes: UnsafeRawBufferPointer, _ offset: Int, _ length: Int) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for i in offset..<(offset + length) { h = (h ^ UInt64(fold(bytes[i]))) &* 0x100_0000_01B3 }
        return h
    }

    static func equal(_ bytes: UnsafeRawBufferPointer, _ offset: Int, _ length: Int, _ folded: [UInt8]) -> Bool {
        guard folded.count == length else { return false }
        for i in 0..<length where fold(bytes[offset + i]) != folded[i] { return false }
        return true
    }
}
