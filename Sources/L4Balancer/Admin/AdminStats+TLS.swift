import Foundation

/// `/stats` → `listeners[].tls`: handshakes by result and version, resumptions, latency,
/// client-certificate failures by reason, and each certificate's names and expiry.
extension WorkerPool {
    func tlsEntry(listener id: Int, _ tls: Config.TLS, stats: [WorkerStats]) -> [String: Any] {
        func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: id) }
        let completed = total(.tlsHandshakes12) + total(.tlsHandshakes13) + total(.tlsHandshakesOther)
        var clientFailures: [String: UInt64] = [:]
        for (counter, reason) in WorkerStats.ListenerCounter.tlsClientFailureReasons { clientFailures[reason] = total(counter) }
        return [
            "handshakes": completed,
            "handshakes_by_version": ["1.2": total(.tlsHandshakes12), "1.3": total(.tlsHandshakes13), "other": total(.tlsHandshakesOther)],
            "handshake_failures": total(.tlsHandshakeFailures),
            "handshake_timeouts": total(.tlsHandshakeTimeouts),
            "handshake_milliseconds_average": completed == 0 ? 0 : Double(total(.tlsHandshakeMilliseconds)) / Double(completed),
            "handshake_milliseconds_histogram": handshakeHistogram(listener: id, stats: stats).map { ["le": $0.le, "count": $0.count] as [String: Any] },
            "resumed": total(.tlsResumed),
            "errors": total(.tlsErrors),
            "client_auth": tls.clientAuth == nil ? "off" : (tls.clientAuth!.required ? "required" : "optional"),
            "client_auth_failures_by_reason": clientFailures,
            "certificates": tls.certificates.map { ["cert": $0.certPath, "names": $0.names, "not_after": $0.notAfter] as [String: Any] },
        ]
    }

    /// `listeners[].upstream_tls` (listeners reaching a cluster with `tls:`): handshakes
    /// l4lb made as the client, of which resumed, and failures (of which the endpoint's
    /// certificate did not verify; timeouts are `connect_timeout`).
    func upstreamTLSEntry(listener id: Int, stats: [WorkerStats]) -> [String: Any] {
        func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: id) }
        return [
            "handshakes": total(.tlsUpstreamHandshakes), "resumed": total(.tlsUpstreamResumed),
            "failures": total(.tlsUpstreamFailures), "unverified": total(.tlsUpstreamUnverified),
        ]
    }

    /// `listeners[].sni` (listeners with `routes`): where ClientHellos went, and why some
    /// connections were closed before any byte reached an upstream.
    func sniEntry(_ listener: Snapshot.ListenerPlan, snapshot: Snapshot, stats: [WorkerStats]) -> [String: Any] {
        func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: listener.id) }
        return [
            "routed": total(.sniRouted), "default": total(.sniDefault), "malformed": total(.sniMalformed),
            "oversize": total(.sniOversize), "timeouts": total(.sniTimeouts),
            "routes": listener.routes.enumerated().map { i, route in
                ["server_names": route.serverNames, "cluster": snapshot.clusters[route.cluster].name,
                 "hits": stats.routeHits(listener: listener.id, route: i)] as [String: Any]
            },
        ]
    }

    /// Cumulative counts of completed handshakes by duration: (upper bound in ms, or
    /// "+Inf"; handshakes that took at most that long).
    func handshakeHistogram(listener id: Int, stats: [WorkerStats]) -> [(le: String, count: UInt64)] {
        var cumulative: UInt64 = 0
        var buckets: [(le: String, count: UInt64)] = []
        let bounds = WorkerStats.ListenerCounter.handshakeBucketMilliseconds
        for i in 0...bounds.count {
            let counter = WorkerStats.ListenerCounter(rawValue: WorkerStats.ListenerCounter.tlsHandshakeBucket0.rawValue + i)!
            cumulative += stats.total(counter, listener: id)
            buckets.append((i < bounds.count ? "\(bounds[i])" : "+Inf", cumulative))
        }
        return buckets
    }
}
