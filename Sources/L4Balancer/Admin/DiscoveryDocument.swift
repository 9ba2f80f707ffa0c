import Foundation

/// `GET /discovery` (and `l4lb discovery`): each endpoint source, what it last answered,
/// when it is asked again and what went wrong last; the xDS stream's versions, nonces and
/// NACKs (issue 36).
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
        var document: [String: Any] = ["dns": dns]
        if let client = xdsClient { document["xds"] = xdsEntry(client, now: now, formatter: formatter) }
        return document
    }

    /// The xDS source: the server and the stream, and per resource type the versions and
    /// nonces, what was accepted and the last NACK.
    func xdsEntry(_ client: XDSClient, now: Int64, formatter: ISO8601DateFormatter) -> [String: Any] {
        let status = client.status
        func date(_ d: Date?) -> Any { d.map { formatter.string(from: $0) } ?? NSNull() }
        func subscription(_ s: XDSClient.Subscription) -> [String: Any] {
            var entry: [String: Any] = [
                "version": s.version, "nonce": s.nonce, "resource_names": s.resourceNames, "resources": s.resources,
                "accepted": s.accepted, "rejected": s.rejected, "last_accepted": date(s.lastAccepted),
            ]
            entry["last_nack"] = s.lastNACK.map { ["version": $0.version, "nonce": $0.nonce, "error": $0.error, "at": formatter.string(from: $0.at)] } ?? NSNull()
            return entry
        }
        return [
            "server": client.settings.server,
            "node_id": client.settings.nodeID,
            "node_cluster": client.settings.nodeCluster,
            "tls": client.settings.tls != nil,
            "connected": status.connected,
            "connected_since": date(status.connectedSince),
            "disconnected_for_ms": status.disconnectedAt.map { now - $0 } ?? NSNull(),
            "streams": status.streams,
            "last_error": status.lastError ?? NSNull(),
            "last_error_at": date(status.lastErrorAt),
            "next_attempt_ms": status.nextAttemptAt.map { max($0 - now, 0) } ?? NSNull(),
            "clusters": subscription(status.clusters),
            "endpoints": subscription(status.assignments),
            "ignored": status.ignored,
        ]
    }
}
