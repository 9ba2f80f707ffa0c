import NIOConcurrencyHelpers
import NIOCore

/// What the admin API may hold, whoever connects (`admin.max_connections`, timeouts). The
/// API shares the process's descriptors with the data plane, so it must never be able to
/// take them: at most `maximum` connections are open at once. A new connection beyond that
/// takes the place of the one that has waited longest without a request in hand (idle, or
/// still sending its head or body), so a crowd of idle or slow clients can neither hold
/// the port nor keep `/healthz` out. A connection whose request is being answered is never
/// evicted; when every one is, the newcomer is refused.
final class AdminConnectionBudget: Sendable {
    struct Limits: Sendable {
        var maximum: Int
        /// A connection waiting for a request, or for the rest of a request's head.
        var idleTimeout: TimeAmount
        /// A request's body, from its head to its end.
        var requestTimeout: TimeAmount
        /// Bodies past this are not read: the connection is reset.
        var maximumBody: Int
    }

    let limits: Limits
    private let state = NIOLockedValueBox(State())

    private struct State {
        var next = 0
        /// Open connections by number; `since` orders the evictable ones (when each last
        /// became idle), nil while a request is being answered.
        var open: [Int: (connection: AdminConnectionGuard, since: NIODeadline?)] = [:]
        var evicted = 0
        var timedOut = 0
        var oversized = 0
    }

    init(_ limits: Limits) { self.limits = limits }

    /// The handler for one new connection.
    func makeGuard() -> AdminConnectionGuard { AdminConnectionGuard(budget: self) }

    /// Takes a place for `connection`; returns the connection to evict for it, if one must
    /// go, or nil with `admitted` false when none can.
    func admit(_ connection: AdminConnectionGuard) -> (admitted: Bool, evict: AdminConnectionGuard?) {
        state.withLockedValue { state in
            var evict: AdminConnectionGuard?
            if state.open.count >= limits.maximum {
                let oldest = state.open.filter { $0.value.since != nil }.min { $0.value.since! < $1.value.since! }
                guard let oldest else { return (false, nil) }
                state.open[oldest.key] = nil
                state.evicted += 1
                evict = oldest.value.connection
            }
            state.next += 1
            connection.number = state.next
            state.open[state.next] = (connection, .now())
            return (true, evict)
        }
    }

    func setEvictable(_ number: Int, _ evictable: Bool) {
        state.withLockedValue { state in state.open[number]?.since = evictable ? .now() : nil }
    }

    func release(_ number: Int) {
        state.withLockedValue { state in _ = state.open.removeValue(forKey: number) }
    }

    enum Reset { case timeout, oversized }

    func count(_ reset: Reset) {
        state.withLockedValue { state in
            switch reset {
            case .timeout: state.timedOut += 1
            case .oversized: state.oversized += 1
            }
        }
    }

    /// For `/stats`: open connections and how many were cut, by reason.
    var document: [String: Any] {
        state.withLockedValue { state in
            ["open": state.open.count, "max_connections": limits.maximum, "evicted": state.evicted,
             "timed_out": state.timedOut, "oversized": state.oversized]
        }
    }
}
