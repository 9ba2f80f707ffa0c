internal import CBPF

#if canImport(Glibc)
import Glibc
#endif

/// The rate limits the XDP program enforces (bpf/rate_limit.bpf.h): one rule per
/// listener, its exempt prefixes, and what it dropped.
extension XDPFilter {
    /// One listener's `rate_limit` as the program applies it. Intervals and tolerances are
    /// GCRA's, in nanoseconds (0: that limit is off).
    public struct RateRule: Equatable, Sendable {
        public enum Transport: Sendable { case tcp, udp }
        /// The listener's identity (stable across reloads, so its buckets carry over).
        public var id: UInt32
        /// The listener's address in network byte order, 4 or 16 bytes; all zero: any.
        public var address: [UInt8]
        public var port: UInt16
        public var transport: Transport
        public var prefixV4: Int
        public var prefixV6: Int
        /// UDP: `connectionInterval` limits new flows (a source port silent for `flowIdle`
        /// starts one); TCP counts SYNs.
        public var udpFlows: Bool
        public var connectionInterval: UInt64
        public var connectionTolerance: UInt64
        public var packetInterval: UInt64
        public var packetTolerance: UInt64
        public var flowIdle: UInt64
        public var exempt: [SourcePrefix]

        public init(id: UInt32, address: [UInt8], port: UInt16, transport: Transport, prefixV4: Int, prefixV6: Int,
                    udpFlows: Bool, connectionInterval: UInt64, connectionTolerance: UInt64,
                    packetInterval: UInt64, packetTolerance: UInt64, flowIdle: UInt64, exempt: [SourcePrefix]) {
            self.id = id
            self.address = address
            self.port = port
            self.transport = transport
            self.prefixV4 = prefixV4
            self.prefixV6 = prefixV6
            self.udpFlows = udpFlows
            self.connectionInterval = connectionInterval
            self.connectionTolerance = connectionTolerance
            self.packetInterval = packetInterval
            self.packetTolerance = packetTolerance
            self.flowIdle = flowIdle
            self.exempt = exempt
        }

        var key: l4lb_rate_listener {
            var key = l4lb_rate_listener()
            withUnsafeMutableBytes(of: &key.addr) { $0.copyBytes(from: address.prefix(16)) }
            key.port = port.bigEndian
            key.protocol = transport == .tcp ? UInt8(IPPROTO_TCP) : UInt8(IPPROTO_UDP)
            key.family = address.count == 4 ? 4 : 6
            return key
        }

        var value: l4lb_rate_rule {
            var value = l4lb_rate_rule()
            value.id = id
            value.prefix_v4 = UInt8(clamping: prefixV4)
            value.prefix_v6 = UInt8(clamping: prefixV6)
            value.udp_flows = udpFlows ? 1 : 0
            value.connection_interval = connectionInterval
            value.connection_tolerance = connectionTolerance
            value.packet_interval = packetInterval
            value.packet_tolerance = packetTolerance
            value.flow_idle_ns = flowIdle
            return value
        }
    }

    /// Installs `rules` in place of the previous set, never leaving a gap: exempt entries
    /// first (a new rule never limits a source it exempts), then the rules, then what is
    /// gone. Counters are kept for identities that stay.
    public func setRateRules(_ rules: [RateRule]) throws(BPFError) {
        let wantedExempt = Set(rules.flatMap { rule in rule.exempt.map { ExemptKey(id: rule.id, prefix: $0) } })
        let installedExempt = Set(installedRateRules.flatMap { rule in rule.exempt.map { ExemptKey(id: rule.id, prefix: $0) } })
        for entry in wantedExempt.subtracting(installedExempt) { try writeExempt(entry, present: true) }
        for rule in rules {
            var id = rule.id
            var zero = [UInt8](repeating: 0, count: cpus * MemoryLayout<l4lb_rate_counters>.stride)
            _ = bpf_map_update_elem(rateCounters, &id, &zero, UInt64(BPF_NOEXIST))
            var key = rule.key
            var value = rule.value
            guard bpf_map_update_elem(rateRules, &key, &value, UInt64(BPF_ANY)) == 0 else {
                throw BPFError("installing the rate limit of listener \(rule.id) on port \(rule.port)", code: errno)
            }
        }
        try setRateRuleCount(max(rules.count, installedRateRules.count))
        let wantedKeys = Set(rules.map { KeyBytes($0.key) })
        let wantedIDs = Set(rules.map(\.id))
        for rule in installedRateRules where !wantedKeys.contains(KeyBytes(rule.key)) {
            var key = rule.key
            _ = bpf_map_delete_elem(rateRules, &key)
        }
        for id in Set(installedRateRules.map(\.id)).subtracting(wantedIDs) {
            var id = id
            _ = bpf_map_delete_elem(rateCounters, &id)
        }
        for entry in installedExempt.subtracting(wantedExempt) { try writeExempt(entry, present: false) }
        installedRateRules = rules
        try setRateRuleCount(rules.count)
    }

    /// What the rule of listener `id` dropped and let through exempt, summed over CPUs.
    public func rateCounters(id: UInt32) -> (newConnections: UInt64, packets: UInt64, exempt: UInt64) {
        var key = id
        var values = [l4lb_rate_counters](repeating: l4lb_rate_counters(), count: cpus)
        guard bpf_map_lookup_elem(rateCounters, &key, &values) == 0 else { return (0, 0, 0) }
        return values.reduce((0, 0, 0)) { ($0.0 &+ $1.new_connections, $0.1 &+ $1.packets, $0.2 &+ $1.exempt) }
    }

    public struct RateTableCounts: Sendable {
        public let size: Int
        public let buckets: Int
        public let bucketInserts: UInt64
        public let flows: Int
        public let flowInserts: UInt64
        /// Sources (flows) the LRU forgot to make room: inserted, and no longer there.
        public var bucketEvictions: UInt64 { bucketInserts &- UInt64(min(UInt64(buckets), bucketInserts)) }
        public var flowEvictions: UInt64 { flowInserts &- UInt64(min(UInt64(flows), flowInserts)) }
    }

    /// The LRU maps' occupancy (walked key by key: a read for /stats, not the data path).
    public func rateTableCounts() -> RateTableCounts {
        var zero: UInt32 = 0
        var values = [l4lb_rate_table](repeating: l4lb_rate_table(), count: cpus)
        let inserts = bpf_map_lookup_elem(rateTable, &zero, &values) == 0
            ? values.reduce((UInt64(0), UInt64(0))) { ($0.0 &+ $1.bucket_inserts, $0.1 &+ $1.flow_inserts) } : (0, 0)
        return RateTableCounts(
            size: rateTableSize,
            buckets: countKeys(rateBuckets, keySize: MemoryLayout<l4lb_rate_bucket_key>.size), bucketInserts: inserts.0,
            flows: countKeys(rateFlows, keySize: MemoryLayout<l4lb_rate_flow_key>.size), flowInserts: inserts.1)
    }

    private func countKeys(_ fd: Int32, keySize: Int) -> Int {
        var key = [UInt8](repeating: 0, count: keySize)
        var next = key
        var count = 0
        var first = true
        while (first ? bpf_map_get_next_key(fd, nil, &next) : bpf_map_get_next_key(fd, &key, &next)) == 0 {
            first = false
            swap(&key, &next)
            count += 1
        }
        return count
    }

    private struct ExemptKey: Hashable {
        let id: UInt32
        let prefix: SourcePrefix
    }

    /// A rule's map key as bytes, to compare keys.
    private struct KeyBytes: Hashable {
        let bytes: [UInt8]
        init(_ key: l4lb_rate_listener) { bytes = withUnsafeBytes(of: key) { Array($0) } }
    }

    private func writeExempt(_ entry: ExemptKey, present: Bool) throws(BPFError) {
        let v4 = entry.prefix.family == .v4
        // prefixlen (the id's 32 bits, then the prefix's), id, address.
        var key = [UInt8](repeating: 0, count: 8 + (v4 ? 4 : 16))
        withUnsafeBytes(of: UInt32(32 + entry.prefix.length)) { key.replaceSubrange(0..<4, with: $0) }
        withUnsafeBytes(of: entry.id) { key.replaceSubrange(4..<8, with: $0) }
        key.replaceSubrange(8..., with: entry.prefix.bytes)
        let fd = v4 ? rateExemptV4 : rateExemptV6
        var one: UInt8 = 1
        let result = present ? bpf_map_update_elem(fd, &key, &one, UInt64(BPF_ANY)) : bpf_map_delete_elem(fd, &key)
        if result != 0, !(!present && errno == ENOENT) {
            throw BPFError("updating the rate-limit exemption \(entry.prefix) of listener \(entry.id)", code: errno)
        }
    }
}
