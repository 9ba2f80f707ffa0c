#if canImport(Glibc)
import Glibc
#endif

/// The balancer a worker runs for one cluster. An enum, not a protocol existential, so a
/// pick is a switch and a direct call; each case is a per-worker object created at start,
/// reading tables the control plane built into the snapshot. No pick allocates.
public enum ClusterBalancer {
    case roundRobin(SmoothRoundRobin)
    /// Round robin for clusters above `SmoothRoundRobin.maximumEndpoints`.
    case deadlineRoundRobin(DeadlineScheduler)
    case random(WeightedRandom)
    case leastRequest(LeastRequest)
    case maglev(MaglevPicker)
    case ringHash(RingHashPicker)

    /// `seed` makes per-worker random streams differ but stay reproducible.
    public init(cluster: Snapshot.ClusterPlan, seed: UInt64) {
        let weights = cluster.weights
        switch cluster.balancer {
        case .roundRobin:
            self = weights.count <= SmoothRoundRobin.maximumEndpoints
                ? .roundRobin(SmoothRoundRobin(weights: weights)) : .deadlineRoundRobin(DeadlineScheduler(weights: weights))
        case .random: self = .random(WeightedRandom(cluster: cluster, seed: seed))
        case .leastRequest: self = .leastRequest(LeastRequest(cluster: cluster, seed: seed))
        case .maglev: self = .maglev(MaglevPicker(cluster: cluster))
        case .ringHash: self = .ringHash(RingHashPicker(cluster: cluster))
        }
    }

    /// Whether picks depend on the flow's hash (so the worker must compute it).
    public var usesFlowHash: Bool {
        switch self {
        case .maglev, .ringHash: return true
        default: return false
        }
    }

    /// An endpoint index within the cluster, never one with weight 0, one `endpoints` says
    /// is unavailable (unhealthy, ejected, drained, at its connection limit), or one in
    /// `tried`. `active` is this worker's active-connection count per endpoint of the
    /// cluster, `clusterActive` their sum.
    @inlinable
    public func pick(
        flowHash: UInt64, tried: TriedEndpoints, active: ActiveCounts, clusterActive: Int,
        endpoints: EndpointView = .allAvailable
    ) -> Int? {
        switch self {
        case .roundRobin(let rr): return rr.pick(tried: tried, endpoints: endpoints)
        case .deadlineRoundRobin(let rr): return rr.pick(tried: tried, endpoints: endpoints)
        case .random(let r): return r.pick(tried: tried, endpoints: endpoints)
        case .leastRequest(let lr): return lr.pick(tried: tried, active: active, endpoints: endpoints)
        case .maglev(let m): return m.pick(flowHash: flowHash, tried: tried, endpoints: endpoints)
        case .ringHash(let r): return r.pick(flowHash: flowHash, tried: tried, active: active, clusterActive: clusterActive, endpoints: endpoints)
        }
    }
}

/// A worker's active connections per endpoint of one cluster: a plain array by position
/// (benchmarks, tests), or the worker's table by endpoint identity read through the
/// snapshot's position → identity map.
public struct ActiveCounts {
    @usableFromInline let base: UnsafePointer<Int32>
    @usableFromInline let ids: UnsafePointer<Int32>?

    @inlinable
    public init(_ base: UnsafePointer<Int32>) {
        self.base = base
        ids = nil
    }

    @inlinable
    init(base: UnsafePointer<Int32>, ids: UnsafePointer<Int32>) {
        self.base = base
        self.ids = ids
    }

    @inlinable
    public subscript(_ i: Int) -> Int32 {
        guard let ids else { return base[i] }
        return base[Int(ids[i])]
    }
}

/// The endpoints a connection has tried already, so a retry goes elsewhere: a bit per
/// endpoint below 64, and for larger clusters a short list of the others (a connection
/// makes at most 16 attempts). Exact for clusters of any size; an integer literal gives
/// the bits.
public struct TriedEndpoints: ExpressibleByIntegerLiteral {
    public var bits: UInt64
    @usableFromInline let others: UnsafePointer<UInt16>?
    @usableFromInline let otherCount: Int

    @inlinable
    public init(bits: UInt64, others: UnsafePointer<UInt16>? = nil, otherCount: Int = 0) {
        self.bits = bits
        self.others = others
        self.otherCount = otherCount
    }

    @inlinable
    public init(integerLiteral value: UInt64) { self.init(bits: value) }

    @inlinable
    public func contains(_ index: Int) -> Bool {
        if index < 64 { return bits & (1 &<< UInt64(index)) != 0 }
        guard let others else { return false }
        for k in 0..<otherCount where Int(others[k]) == index { return true }
        return false
    }
}

@inlinable
func isTried(_ index: Int, _ tried: TriedEndpoints) -> Bool { tried.contains(index) }

/// Not tried yet for this connection and able to take it.
@inlinable
func isEligible(_ index: Int, _ tried: TriedEndpoints, _ endpoints: EndpointView) -> Bool {
    !isTried(index, tried) && endpoints.isAvailable(index)
}

/// Weighted random: an alias table, one random number per pick.
public final class WeightedRandom {
    @usableFromInline let table: AliasTable
    @usableFromInline let weights: [Int]
    @usableFromInline var random: FastRandom

    public init(cluster: Snapshot.ClusterPlan, seed: UInt64) {
        table = cluster.aliasTable
        weights = cluster.weights
        random = FastRandom(seed: seed)
    }

    @inlinable
    public func pick(tried: TriedEndpoints, endpoints: EndpointView) -> Int? {
        // A cluster with no endpoints (a dns: cluster before its first answer, or past hold).
        guard !weights.isEmpty else { return nil }
        for _ in 0..<8 {
            let i = table.pick(random.next())
            if weights[i] > 0, isEligible(i, tried, endpoints) { return i }
        }
        // Most endpoints excluded: scan from a random start.
        let start = random.next(below: weights.count)
        for k in 0..<weights.count {
            let i = (start + k) % weights.count
            if weights[i] > 0, isEligible(i, tried, endpoints) { return i }
        }
        return nil
    }
}

/// Envoy's least request. Equal weights: sample `choiceCount` endpoints uniformly, take the
/// one with fewest active connections (power of two choices). Unequal weights: sample
/// `choiceCount` by weight and take the highest `weight / (active + 1)^bias`. Active counts
/// are this worker's own, as in Envoy; connections still connecting count.
public final class LeastRequest {
    @usableFromInline let weights: [Int]
    @usableFromInline let table: AliasTable
    @usableFromInline let equalWeights: Bool
    @usableFromInline let choiceCount: Int
    @usableFromInline let bias: Double
    @usableFromInline var random: FastRandom

    public init(cluster: Snapshot.ClusterPlan, seed: UInt64) {
        weights = cluster.weights
        table = cluster.aliasTable
        let positive = weights.filter { $0 > 0 }
        equalWeights = Set(positive).count <= 1
        choiceCount = cluster.choiceCount
        bias = cluster.activeRequestBias
        random = FastRandom(seed: seed)
    }

    @inlinable
    func score(_ i: Int, _ active: ActiveCounts) -> Double {
        let load = Double(active[i]) + 1
        let divisor = bias == 1 ? load : (bias == 0 ? 1 : pow(load, bias))
        return Double(weights[i]) / divisor
    }

    @inlinable
    public func pick(tried: TriedEndpoints, active: ActiveCounts, endpoints: EndpointView) -> Int? {
        guard !weights.isEmpty else { return nil }
        var best = -1
        var bestActive = Int32.max
        var bestScore = -1.0
        var draws = 0
        var found = 0
        while found < choiceCount, draws < choiceCount * 8 {
            draws += 1
            let i = equalWeights ? random.next(below: weights.count) : table.pick(random.next())
            guard weights[i] > 0, isEligible(i, tried, endpoints) else { continue }
            found += 1
            if equalWeights {
                if active[i] < bestActive {
                    best = i
                    bestActive = active[i]
                }
            } else {
                let s = score(i, active)
                if s > bestScore {
                    best = i
                    bestScore = s
                }
            }
        }
        if best >= 0 { return best }
        for i in 0..<weights.count where weights[i] > 0 && isEligible(i, tried, endpoints) {
            if best < 0 || active[i] < active[best] { best = i }
        }
        return best >= 0 ? best : nil
    }
}

/// Maglev: the table is the snapshot's; a worker only looks up.
public final class MaglevPicker {
    @usableFromInline let table: MaglevTable
    @usableFromInline let weights: [Int]

    public init(cluster: Snapshot.ClusterPlan) {
        table = cluster.maglevTable ?? MaglevTable(endpoints: [], size: 2)
        weights = cluster.weights
    }

    @inlinable
    public func pick(flowHash: UInt64, tried: TriedEndpoints, endpoints: EndpointView) -> Int? {
        let weights = self.weights
        return table.lookup(flowHash) { weights[$0] > 0 && isEligible($0, tried, endpoints) }
    }
}

/// Ring hash with optional bounded load: an endpoint is skipped while it holds more than
/// `⌈factor × (active + 1) / endpoints⌉` of this worker's connections to the cluster.
public final class RingHashPicker {
    @usableFromInline let ring: HashRing
    @usableFromInline let weights: [Int]
    /// Percent (125 = 1.25×), or 0 for unbounded.
    @usableFromInline let balanceFactor: Int
    @usableFromInline let eligible: Int

    public init(cluster: Snapshot.ClusterPlan) {
        ring = cluster.hashRing ?? HashRing(endpoints: [])
        weights = cluster.weights
        balanceFactor = cluster.hashBalanceFactor ?? 0
        eligible = max(1, cluster.weights.filter { $0 > 0 }.count)
    }

    @inlinable
    public func pick(flowHash: UInt64, tried: TriedEndpoints, active: ActiveCounts, clusterActive: Int, endpoints: EndpointView) -> Int? {
        let weights = self.weights
        if balanceFactor == 0 {
            return ring.lookup(flowHash) { weights[$0] > 0 && isEligible($0, tried, endpoints) }
        }
        // ⌈factor/100 × (total + 1) / n⌉, the most any endpoint may hold after this pick.
        let bound = Int32((balanceFactor * (clusterActive + 1) + 100 * eligible - 1) / (100 * eligible))
        if let bounded = ring.lookup(flowHash, accept: { weights[$0] > 0 && isEligible($0, tried, endpoints) && active[$0] + 1 <= bound }) {
            return bounded
        }
        return ring.lookup(flowHash) { weights[$0] > 0 && isEligible($0, tried, endpoints) }
    }
}
