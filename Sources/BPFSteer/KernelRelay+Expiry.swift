internal import CBPF
import Foundation

/// Expiry of the flow table's TCP entries (issue 35): the kernel never removes an entry,
/// user space does, a flow (both its entries) at a time.
extension KernelRelay {
    /// What one pass over the table saw and did.
    public struct SweepResult: Sendable, Equatable {
        /// TCP entries (two per flow) left in the table after the pass.
        public var tcpEntries = 0
        /// Flows removed because they had been idle too long.
        public var expiredIdle = 0
        /// Flows removed after a RST, or a FIN each way.
        public var expiredClosed = 0
        public init() {}
    }

    /// Removes every kernel TCP flow idle for longer than `idleNanoseconds(listener)` (by
    /// the listener the flow came in on), or, once a RST or a FIN each way has been seen,
    /// for longer than `closedNanoseconds`. `now` is CLOCK_MONOTONIC, as the program's.
    /// Entries installed by hand (listener 0, never seen) follow the same rules.
    public func sweep(now: UInt64, closedNanoseconds: UInt64, idleNanoseconds: (Int) -> UInt64) -> SweepResult {
        let fd = mapFD("kr_flows")
        var result = SweepResult()
        var keys: [l4lb_kr_tuple] = []
        var key = l4lb_kr_tuple()
        var next = l4lb_kr_tuple()
        var first = true
        // Keys first, then decisions: deleting while walking would restart the walk.
        while (first ? bpf_map_get_next_key(fd, nil, &next) : bpf_map_get_next_key(fd, &key, &next)) == 0 {
            first = false
            keys.append(next)
            key = next
        }
        var removed = Set<[UInt8]>()
        for var entry in keys where entry.protocol == 6 {
            let id = withUnsafeBytes(of: entry) { Array($0) }
            if removed.contains(id) { continue }
            var flow = l4lb_kr_flow()
            guard bpf_map_lookup_elem(fd, &entry, &flow) == 0 else { continue }
            var pairKey = l4lb_kr_tuple()
            pairKey.saddr = flow.daddr
            pairKey.daddr = flow.saddr
            pairKey.sport = flow.dport
            pairKey.dport = flow.sport
            pairKey.protocol = entry.protocol
            pairKey.family = entry.family
            var pair = l4lb_kr_flow()
            let hasPair = bpf_map_lookup_elem(fd, &pairKey, &pair) == 0
            let last = max(flow.last_ns, hasPair ? pair.last_ns : 0)
            let reset = (flow.state | (hasPair ? pair.state : 0)) & UInt8(L4LB_KR_STATE_RST) != 0
            let finished = flow.state & UInt8(L4LB_KR_STATE_FIN) != 0 && (!hasPair || pair.state & UInt8(L4LB_KR_STATE_FIN) != 0)
            let closed = reset || finished
            let limit = closed ? min(closedNanoseconds, idleNanoseconds(Int(flow.listener))) : idleNanoseconds(Int(flow.listener))
            guard now > last, now - last > limit else {
                result.tcpEntries += 1
                continue
            }
            bpf_map_delete_elem(fd, &entry)
            if hasPair {
                bpf_map_delete_elem(fd, &pairKey)
                removed.insert(withUnsafeBytes(of: pairKey) { Array($0) })
            }
            if closed { result.expiredClosed += 1 } else { result.expiredIdle += 1 }
        }
        return result
    }

    /// CLOCK_MONOTONIC now, in nanoseconds: the program's `bpf_ktime_get_ns`.
    public static func monotonicNanoseconds() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }
}
