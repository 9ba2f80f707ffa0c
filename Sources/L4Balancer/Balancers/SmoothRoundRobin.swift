/// nginx's smooth weighted round robin: every pick adds each weight to its running score,
/// takes the highest score, and subtracts the total from the winner. Weights 5:1:1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c. Deterministic for a given weight list.
/// One per worker per cluster, created at start-up; a pick allocates nothing. A pick is
/// O(n), so clusters above `maximumEndpoints` use `DeadlineScheduler` instead.
public final class SmoothRoundRobin {
    public static let maximumEndpoints = 64

    @usableFromInline let weights: UnsafeMutableBufferPointer<Int>
    @usableFromInline let scores: UnsafeMutableBufferPointer<Int>
    @usableFromInline let total: Int
    /// The endpoints (the buffers hold at least one slot, even for none).
    @usableFromInline let endpointCount: Int

    public init(weights: [Int]) {
        self.weights = .allocate(capacity: max(weights.count, 1))
        self.scores = .allocate(capacity: max(weights.count, 1))
        _ = self.weights.initialize(from: weights)
        self.scores.initialize(repeating: 0)
        self.total = weights.reduce(0, +)
        self.endpointCount = weights.count
    }

    deinit {
        weights.deallocate()
        scores.deallocate()
    }

    public var count: Int { endpointCount }

    /// The next index, skipping those in `tried`; nil when
    /// every index with a weight above 0 is skipped.
    @inlinable
    public func pick(tried: TriedEndpoints = 0, endpoints: EndpointView = .allAvailable) -> Int? {
        var best = -1
        var bestScore = Int.min
        var eligibleTotal = 0
        for i in 0..<endpointCount where weights[i] > 0 && isEligible(i, tried, endpoints) {
            scores[i] &+= weights[i]
            eligibleTotal &+= weights[i]
            if scores[i] > bestScore {
                bestScore = scores[i]
                best = i
            }
        }
        guard best >= 0 else { return nil }
        scores[best] &-= eligibleTotal
        return best
    }
}
