/// Vose's alias method: a weighted choice in O(1) with one random number. Built once per
/// cluster by the control plane.
public struct AliasTable: Sendable {
    /// Per column: the probability (scaled to 2^32) of keeping the column, else its alias.
    public let keep: [UInt32]
    public let alias: [Int32]

    public init(weights: [Int]) {
        let n = weights.count
        let total = Double(weights.reduce(0, +))
        var keep = [UInt32](repeating: 0, count: n)
        var alias = [Int32](repeating: 0, count: n)
        guard n > 0, total > 0 else {
            self.keep = keep
            self.alias = alias
            return
        }
        var scaled = weights.map { Double($0) * Double(n) / total }
        var small = scaled.indices.filter { scaled[$0] < 1 }
        var large = scaled.indices.filter { scaled[$0] >= 1 }
        while let s = small.popLast(), let l = large.last {
            keep[s] = UInt32(min(scaled[s] * 4_294_967_296.0, 4_294_967_295.0))
            alias[s] = Int32(l)
            scaled[l] -= 1 - scaled[s]
            if scaled[l] < 1 {
                large.removeLast()
                small.append(l)
            }
        }
        for i in large + small {
            keep[i] = UInt32.max
            alias[i] = Int32(i)
        }
        self.keep = keep
        self.alias = alias
    }

    @inlinable
    public func pick(_ random: UInt64) -> Int {
        let column = Int(truncatingIfNeeded: ((random >> 32) &* UInt64(keep.count)) >> 32)
        return UInt32(truncatingIfNeeded: random) < keep[column] ? column : Int(alias[column])
    }
}
