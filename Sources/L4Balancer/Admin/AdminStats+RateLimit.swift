import Foundation

/// `rate_limit` in `/stats` (per listener, and the shared source table) and
/// `GET /ratelimit/top`.
extension WorkerPool {
    func rateLimitEntry(listener: Int, _ limit: Config.RateLimit, stats: [WorkerStats]) -> [String: Any] {
        var limited: [String: UInt64] = [:]
        for (counter, reason) in WorkerPool.rateLimitCounters { limited[reason.name] = stats.total(counter, listener: listener) }
        var entry: [String: Any] = [
            "limited": limited,
            "exempt_admitted": stats.total(.rateLimitExempt, listener: listener),
            "prefix_v4": limit.prefixV4,
            "prefix_v6": limit.prefixV6,
            "enforced_in": "userspace",
        ]
        func bucket(_ b: Config.RateLimit.Bucket) -> [String: Any] { ["rate_per_second": b.rate, "burst": b.burst] }
        if let b = limit.newConnections { entry["new_connections"] = bucket(b) }
        if let b = limit.packets { entry["packets"] = bucket(b) }
        if let m = limit.maxConnections { entry["max_connections"] = m }
        return entry
    }

    static let rateLimitCounters: [(WorkerStats.ListenerCounter, RateLimitReason)] = [
        (.rateLimitedNewConnections, .newConnections), (.rateLimitedPackets, .packets), (.rateLimitedMaxConnections, .maxConnections),
    ]

    /// The shared source table: its size, sources tracked, forgotten for room, untracked.
    func rateLimitTableDocument() -> [String: Any] {
        let table = limits.sources
        return [
            "table_size": table.capacity,
            "slots_used": table.count(.tracked),
            "evictions": table.count(.evictions),
            "untracked": table.count(.untracked),
        ]
    }

    public var rateLimitTable: (size: Int, evictions: UInt64, untracked: UInt64) {
        (limits.sources.capacity, limits.sources.count(.evictions), limits.sources.count(.untracked))
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
