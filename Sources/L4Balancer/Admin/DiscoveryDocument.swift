import Foundation

/// `GET /discovery` (and `l4lb discovery`): each endpoint source, what it last answered,
/// when it is asked again and what went wrong last (issue 36).
extension WorkerPool {
    public func discoveryDocument() -> [String: Any] {
        let now = monotonicMilliseconds()
        let formatter = ISO8601DateFormatter()
        let dns: [[String: Any]] = dnsDiscovery.snapshot.map { source in
            var entry: [String: Any] = [
                "cluster": source.cluster,
                "name": source.settings.name,
                "type": source.settings.type.rawValue,
                "resolvers": source.settings.resolvers.isEmpty ? ["/etc/resolv.conf"] : source.settings.resolvers.map(\.description),
                "state": source.state,
                "endpoints": (source.endpoints ?? []).map { ["address": $0.address.description, "weight": $0.weight] },
                "updates": source.updates,
                "failures": source.failures,
                "next_resolution_ms": max(source.nextAt - now, 0),
            ]
            entry["last_answer"] = source.lastAnswer.map { formatter.string(from: $0) } ?? NSNull()
            entry["ttl"] = source.ttl.map { Int($0) } ?? NSNull()
            entry["over_tcp"] = source.overTCP
            entry["last_error"] = source.lastError ?? NSNull()
            entry["last_error_at"] = source.lastErrorAt.map { formatter.string(from: $0) } ?? NSNull()
            entry["failing_for_ms"] = source.failingSince.map { now - $0 } ?? NSNull()
            return entry
        }
        return ["dns": dns]
    }
}
