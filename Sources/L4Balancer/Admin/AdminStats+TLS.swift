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
            "resumed": total(.tlsResumed),
            "errors": total(.tlsErrors),
            "client_auth": tls.clientAuth == nil ? "off" : (tls.clientAuth!.required ? "required" : "optional"),
            "client_auth_failures_by_reason": clientFailures,
            "certificates": tls.certificates.map { ["cert": $0.certPath, "names": $0.names, "not_after": $0.notAfter] as [String: Any] },
        ]
    }

    /// `listeners[].sni` (listeners with `routes`): where ClientHellos went, and why some
    /// connections were closed before any byte reached an upstream.
    func sniEntry(listener id: Int, stats: [WorkerStats]) -> [String: Any] {
        func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: id) }
        return [
            "routed": total(.sniRouted), "default": total(.sniDefault), "malformed": total(.sniMalformed),
            "oversize": total(.sniOversize), "timeouts": total(.sniTimeouts),
        ]
    }
}
