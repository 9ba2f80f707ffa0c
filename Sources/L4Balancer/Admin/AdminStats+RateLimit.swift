import BPFSteer
import Foundation

/// `rate_limit` in `/stats` (per listener, and the shared source table) and
/// `GET /ratelimit/top`.
extension WorkerPool {
    func rateLimitEntry(_ listener: Snapshot.ListenerPlan, _ limit: Config.RateLimit, stats: [WorkerStats]) -> [String: Any] {
        let counts = rateLimited(listener, stats: stats)
        var limited: [String: UInt64] = [:]
        for (reason, count) in counts.byReason { limited[reason.name] = count }
        var entry: [String: Any] = [
            "limited": limited,
            "exempt_admitted": counts.exempt,
            "prefix_v4": limit.prefixV4,
            "prefix_v6": limit.prefixV6,
            // Where new_connections and packets are enforced; max_connections is always
            // the workers' (it needs to see connections close).
            "enforced_in": listener.rateLimitInKernel ? "xdp" : "userspace",
        ]
        func bucket(_ b: Config.RateLimit.Bucket) -> [String: Any] { ["rate_per_second": b.rate, "burst": b.burst] }
        if let b = limit.newConnections { entry["new_connections"] = bucket(b) }
        if let b = limit.packets { entry["packets"] = bucket(b) }
        if let m = limit.maxConnections { entry["max_connections"] = m }
        return entry
    }

    /// What a listener's limits refused, by reason, and the exempt sources let through: the
    /// workers' counts plus, where XDP enforces the buckets, the program's.
    func rateLimited(_ listener: Snapshot.ListenerPlan, stats: [WorkerStats]) -> (byReason: [(RateLimitReason, UInt64)], exempt: UInt64) {
        let kernel: (newConnections: UInt64, packets: UInt64, exempt: UInt64) =
            listener.rateLimitInKernel ? filter.kernelRateCounters(listener: listener.id) : (0, 0, 0)
        let byReason = WorkerPool.rateLimitCounters.map { counter, reason -> (RateLimitReason, UInt64) in
            let inKernel: UInt64 = switch reason {
            case .newConnections: kernel.newConnections
            case .packets: kernel.packets
            case .maxConnections: 0
            }
            return (reason, stats.total(counter, listener: listener.id) &+ inKernel)
        }
        return (byReason, stats.total(.rateLimitExempt, listener: listener.id) &+ kernel.exempt)
    }

    static let rateLimitCounters: [(WorkerStats.ListenerCounter, RateLimitReason)] = [
        (.rateLimitedNewConnections, .newConnections), (.rateLimitedPackets, .packets), (.rateLimitedMaxConnections, .maxConnections),
    ]

    /// The shared source table: its size, sources tracked, forgotten for room, untracked;
    /// and the XDP program's LRU maps when it is attached.
    func rateLimitTableDocument() -> [String: Any] {
        let table = limits.sources
        var document: [String: Any] = [
            "table_size": table.capacity,
            "slots_used": table.count(.tracked),
            "evictions": table.count(.evictions),
            "untracked": table.count(.untracked),
        ]
        if let kernel = filter.kernelRateTable() {
            document["xdp"] = [
                "table_size": kernel.size,
                "sources": kernel.buckets, "source_evictions": kernel.bucketEvictions,
                "udp_flows": kernel.flows, "udp_flow_evictions": kernel.flowEvictions,
            ] as [String: Any]
        }
        return document
    }

    public var rateLimitTable: (size: Int, evictions: UInt64, untracked: UInt64, kernel: XDPFilter.RateTableCounts?) {
        (limits.sources.capacity, limits.sources.count(.evictions), limits.sources.count(.untracked), filter.kernelRateTable())
    }

    /// `GET /ratelimit/top`: the sources limited most in the last minute, per listener.
    public func rateLimitTopDocument(limit: Int = 20) -> [String: Any] {
        let snapshot = store.snapshot
        let names = Dictionary(snapshot.listeners.map { ($0.id, $0.name) }) { a, _ in a }
        let sources = limits.sources.limitedSources(now: SourceTable.now(), top: limit).map { source -> [String: Any] in
            [
                "source": source.key.prefix.description,
                "listener": names[source.key.listener] ?? "(removed)",
                "limited_last_minute": source.limited,
                "reasons": source.reasons.map(\.name),
                "connections": source.connections,
            ]
        }
        return ["window_seconds": 60, "sources": sources, "table": rateLimitTableDocument()]
    }
}
