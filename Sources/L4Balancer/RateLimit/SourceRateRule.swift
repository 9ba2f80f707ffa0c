/// One listener's `rate_limit` as the workers apply it: intervals and tolerances in
/// nanoseconds (0: that limit is off), prefix lengths, and the exempt sources. Built when
/// a worker adopts a snapshot, never per connection.
final class SourceRateRule {
    let listener: Int
    let connectionInterval: UInt64
    let connectionTolerance: UInt64
    let packetInterval: UInt64
    let packetTolerance: UInt64
    /// 0: no limit on concurrent connections.
    let maxConnections: Int
    let prefixV4: Int
    let prefixV6: Int
    let exempt: PrefixSet

    /// `bucketsInKernel`: XDP enforces `new_connections` and `packets`; only
    /// `max_connections` is left to the workers.
    init(_ limit: Config.RateLimit, listener: Int, bucketsInKernel: Bool) {
        self.listener = listener
        let connections = bucketsInKernel ? nil : limit.newConnections
        let packets = bucketsInKernel ? nil : limit.packets
        connectionInterval = connections?.intervalNanoseconds ?? 0
        connectionTolerance = connections?.toleranceNanoseconds ?? 0
        packetInterval = packets?.intervalNanoseconds ?? 0
        packetTolerance = packets?.toleranceNanoseconds ?? 0
        maxConnections = limit.maxConnections ?? 0
        prefixV4 = limit.prefixV4
        prefixV6 = limit.prefixV6
        exempt = PrefixSet(limit.exempt)
    }

    var limitsNewSources: Bool { connectionInterval > 0 || maxConnections > 0 }
}
