/// `rate_limit` in user space: per source prefix, a GCRA bucket for new connections (or
/// UDP sessions) and one for datagrams, and a count of concurrent connections, all in the
/// `SourceTable` every worker shares — so a source's budget is the same however
/// `SO_REUSEPORT` spreads its connections. No lock: a few atomic operations on the
/// source's own cache line.
extension Worker {
    /// A new connection or UDP session from the source at `raw` (a `sockaddr_in/in6`).
    /// Returns `limitedVerdict` when it is over a limit (counted), else the connection
    /// place it took (table slot + 1), or 0 when it took none.
    @inline(__always)
    func admitNewSource(_ raw: UnsafeRawPointer, _ rule: SourceRateRule, listener: Int) -> UInt32 {
        guard let address = SourceAddress(raw) else { return 0 }
        if rule.exempt.contains(address) {
            stats.add(.rateLimitExempt, listener: listener)
            return 0
        }
        let sources = shared.limits.sources
        let now = SourceTable.now()
        guard let (slot, tag) = sources.slot(for: SourceKey(address, listener: listener, prefixV4: rule.prefixV4, prefixV6: rule.prefixV6), now: now)
        else { return 0 }
        var place: UInt32 = 0
        if rule.maxConnections > 0 {
            guard sources.enter(slot, tag: tag, maximum: rule.maxConnections) else {
                noteLimited(slot, .maxConnections, listener: listener, now: now)
                return Worker.limitedVerdict
            }
            place = UInt32(slot) + 1
        }
        if rule.connectionInterval > 0,
           !sources.take(slot, .connectionTAT, interval: rule.connectionInterval, tolerance: rule.connectionTolerance, now: now) {
            if place != 0 { sources.leave(slot) }
            noteLimited(slot, .newConnections, listener: listener, now: now)
            return Worker.limitedVerdict
        }
        return place
    }

    static let limitedVerdict = UInt32.max

    /// A datagram from the source at `raw`: false when it is over its `packets` limit
    /// (counted; the datagram is dropped).
    @inline(__always)
    func admitDatagram(_ raw: UnsafeRawPointer, _ rule: SourceRateRule, listener: Int) -> Bool {
        guard let address = SourceAddress(raw), !rule.exempt.contains(address) else { return true }
        let sources = shared.limits.sources
        let now = SourceTable.now()
        guard let (slot, _) = sources.slot(for: SourceKey(address, listener: listener, prefixV4: rule.prefixV4, prefixV6: rule.prefixV6), now: now)
        else { return true }
        if sources.take(slot, .packetTAT, interval: rule.packetInterval, tolerance: rule.packetTolerance, now: now) { return true }
        noteLimited(slot, .packets, listener: listener, now: now)
        return false
    }

    /// Gives back a place `admitNewSource` returned.
    @inline(__always)
    func leaveSource(_ place: UInt32) {
        if place != 0 { shared.limits.sources.leave(Int(place) - 1) }
    }

    private func noteLimited(_ slot: Int, _ reason: RateLimitReason, listener: Int, now: UInt64) {
        let counter: WorkerStats.ListenerCounter = switch reason {
        case .newConnections: .rateLimitedNewConnections
        case .packets: .rateLimitedPackets
        case .maxConnections: .rateLimitedMaxConnections
        }
        stats.add(counter, listener: listener)
        shared.limits.sources.noteLimited(slot, reason: reason, now: now)
    }
}
