internal import CBPF
import Foundation

/// Expiry of the flow table's entries (issue 35): the kernel never removes an entry,
/// user space does, a flow (both its entries) at a time.
extension KernelRelay {
    /// What one pass over the table saw and did.
    public struct SweepResult: Sendable, Equatable {
        /// Entries (two per flow) left in the table after the pass.
        public var entries = 0
        /// Flows removed because they had been idle too long.
        public var expiredIdle = 0
        /// Flows removed after a RST, or a FIN each way.
        public var expiredClosed = 0
        /// Kernel-started TCP flows removed because the client never acknowledged the
        /// endpoint's SYN-ACK within the listener's connect timeout (spoofed SYNs among them).
        public var expiredHalfOpen = 0
        /// Kernel-started flows left, by listener identity and by endpoint slot.
        public var activeByListener: [Int: Int] = [:]
        public var activeBySlot: [Int: Int] = [:]
        /// Half-open flows removed whose endpoint never answered the SYN at all (no SYN-ACK,
        /// RST or ICMP error), by endpoint slot: connects that timed out.
        public var connectTimeoutsBySlot: [Int: Int] = [:]
        public var connectTimeoutsByListener: [Int: Int] = [:]
        public init() {}

        /// One flow kept (its entry and the other half's, if any): counted where its
        /// client-side entry belongs.
        mutating func keep(_ flow: l4lb_kr_flow, _ pair: l4lb_kr_flow?) {
            entries += pair == nil ? 1 : 2
            let client = flow.state & UInt8(L4LB_KR_STATE_REPLY) == 0 ? flow : pair
            guard let client, client.state & UInt8(L4LB_KR_STATE_REPLY) == 0 else { return }
            activeByListener[Int(client.listener), default: 0] += 1
            if client.endpoint != UInt16(L4LB_KR_NO_SLOT) { activeBySlot[Int(client.endpoint), default: 0] += 1 }
        }
    }

    /// Removes every kernel flow idle for longer than `limits(listener).idle` (by the
    /// listener the flow came in on), or, once a RST or a FIN each way has been seen, for
    /// longer than `closedNanoseconds`, or, a kernel-started TCP flow not yet established
    /// (`L4LB_KR_STATE_ESTABLISHED`), for longer than `limits(listener).connect`. Entries a worker installed for a UDP session
    /// (`L4LB_KR_STATE_SESSION`) are its to remove, and stay. `now` is CLOCK_MONOTONIC, as the program's.
    /// Entries installed by hand (listener 0, never seen) follow the same rules.
    public func sweep(now: UInt64, closedNanoseconds: UInt64, limits: (Int) -> (idle: UInt64, connect: UInt64)) -> SweepResult {
        let fd = mapFD("kr_flows")
        var result = SweepResult()
        let (keys, values) = readAll(fd)
        // Each entry's position by its key, to find its pair without a syscall.
        var position: [FlowKey: Int] = [:]
        position.reserveCapacity(keys.count)
        for (i, key) in keys.enumerated() { position[FlowKey(key)] = i }
        // Keys with their values as read: deleted only if still the same (a SYN may have
        // reused a closed flow's NAT port since the read).
        enum Reason { case idle, closed, halfOpen }
        var doomed: [(key: l4lb_kr_tuple, value: l4lb_kr_flow, pair: (key: l4lb_kr_tuple, value: l4lb_kr_flow)?, reason: Reason)] = []
        var decided = [Bool](repeating: false, count: keys.count)
        for (i, key) in keys.enumerated() where !decided[i] {
            decided[i] = true
            let flow = values[i]
            // A worker's UDP session: the worker ends it, with its session.
            guard flow.state & UInt8(L4LB_KR_STATE_SESSION) == 0 else {
                result.entries += 1
                continue
            }
            var pairKey = l4lb_kr_tuple()
            pairKey.saddr = flow.daddr
            pairKey.daddr = flow.saddr
            pairKey.sport = flow.dport
            pairKey.dport = flow.sport
            pairKey.protocol = key.protocol
            pairKey.family = key.family
            let pairIndex = position[FlowKey(pairKey)]
            if let pairIndex { decided[pairIndex] = true }
            var pair = pairIndex.map { values[$0] }
            if pair == nil {
                // Not in the read (a bucket walked before the pair went in): ask the map, so
                // a flow still opening is not judged by one entry alone.
                var found = l4lb_kr_flow()
                if bpf_map_lookup_elem(fd, &pairKey, &found) == 0 { pair = found }
            }
            let last = max(flow.last_ns, pair?.last_ns ?? 0)
            let state = flow.state | (pair?.state ?? 0)
            let reset = state & UInt8(L4LB_KR_STATE_RST) != 0
            let finished = flow.state & UInt8(L4LB_KR_STATE_FIN) != 0 && (pair.map { $0.state & UInt8(L4LB_KR_STATE_FIN) != 0 } ?? true)
            let closed = reset || finished
            // The client's direction says whether a kernel-started TCP flow got established.
            let client = flow.state & UInt8(L4LB_KR_STATE_REPLY) == 0 ? flow : pair
            // (A kernel-started entry whose other half is gone carries nothing: it goes as soon.)
            let kernelStarted = flow.endpoint != UInt16(L4LB_KR_NO_SLOT)
            // Never established: it goes at the connect timeout, reset or not (an endpoint
            // answering a SYN-ACK retransmission from a spoofer with a RST must not keep it
            // for the closed grace).
            let halfOpen = key.protocol == 6 && kernelStarted
                && (client.map { $0.state & UInt8(L4LB_KR_STATE_ESTABLISHED) == 0 } ?? true)
            let (idle, connect) = limits(Int(flow.listener))
            let limit = halfOpen ? min(connect, idle) : closed ? min(closedNanoseconds, idle) : idle
            // A half-open flow ages from the client's last SYN: the endpoint retransmitting
            // its SYN-ACK to a client that never answers does not keep it.
            let since = halfOpen ? (client?.last_ns ?? last) : last
            guard now > since, now - since > limit else {
                result.keep(flow, pair)
                continue
            }
            doomed.append((key, flow, pair.map { (pairKey, $0) }, halfOpen ? .halfOpen : closed ? .closed : .idle))
        }
        // Each doomed entry is read again and deleted only if unchanged: a packet since the
        // read (its flow is alive after all) or a new flow on a reused NAT port keeps it.
        func deleteIfUnchanged(_ key: l4lb_kr_tuple, _ value: l4lb_kr_flow) -> Bool {
            var key = key, value = value, now = l4lb_kr_flow()
            guard bpf_map_lookup_elem(fd, &key, &now) == 0 else { return false }
            let unchanged = withUnsafeBytes(of: &now) { a in withUnsafeBytes(of: &value) { b in a.elementsEqual(b) } }
            return unchanged && bpf_map_delete_elem(fd, &key) == 0
        }
        func deleteIfSameFlow(_ key: l4lb_kr_tuple, _ value: l4lb_kr_flow) -> Bool {
            var key = key, now = l4lb_kr_flow()
            guard bpf_map_lookup_elem(fd, &key, &now) == 0 else { return false }
            let same = withUnsafeBytes(of: (now.saddr, now.daddr)) { a in withUnsafeBytes(of: (value.saddr, value.daddr)) { b in a.elementsEqual(b) } }
                && now.sport == value.sport && now.dport == value.dport && now.listener == value.listener && now.endpoint == value.endpoint
            return same && bpf_map_delete_elem(fd, &key) == 0
        }
        for flow in doomed {
            guard deleteIfUnchanged(flow.key, flow.value) else {
                result.keep(flow.value, flow.pair?.value)
                continue
            }
            // The other half goes too unless a new flow has taken its key since (a reused
            // NAT port): packets since the read change its counts, not where it leads.
            if let pair = flow.pair { _ = deleteIfSameFlow(pair.key, pair.value) }
            switch flow.reason {
            case .closed: result.expiredClosed += 1
            case .halfOpen:
                result.expiredHalfOpen += 1
                let reply = flow.value.state & UInt8(L4LB_KR_STATE_REPLY) != 0 ? flow.value : flow.pair?.value
                if let reply, reply.packets == 0, reply.state & UInt8(L4LB_KR_STATE_ANSWERED) == 0, reply.endpoint != UInt16(L4LB_KR_NO_SLOT) {
                    result.connectTimeoutsBySlot[Int(reply.endpoint), default: 0] += 1
                    result.connectTimeoutsByListener[Int(reply.listener), default: 0] += 1
                }
            case .idle: result.expiredIdle += 1
            }
        }
        return result
    }

    /// Removes every kernel-started TCP flow (both entries) to the endpoints in kernel slots
    /// `slots`: they turned unhealthy under `on_unhealthy: close`. The client's next segment,
    /// and the endpoint's, then meet a reset from the stack, which has no connection for
    /// them. Returns the flows removed by listener identity.
    public func closeFlows(toSlots slots: Set<Int>) -> [Int: Int] {
        let fd = mapFD("kr_flows")
        let (keys, values) = readAll(fd)
        var closed: [Int: Int] = [:]
        for (key, flow) in zip(keys, values) {
            guard key.protocol == 6, flow.state & UInt8(L4LB_KR_STATE_SESSION) == 0, flow.endpoint != UInt16(L4LB_KR_NO_SLOT),
                  slots.contains(Int(flow.endpoint)) else { continue }
            var key = key
            guard bpf_map_delete_elem(fd, &key) == 0 else { continue }
            if flow.state & UInt8(L4LB_KR_STATE_REPLY) == 0 { closed[Int(flow.listener), default: 0] += 1 }
        }
        return closed
    }

    /// Every entry of the flow table, read in batches of 8,192 (a syscall each).
    private func readAll(_ fd: Int32) -> (keys: [l4lb_kr_tuple], values: [l4lb_kr_flow]) {
        let batch = 8192
        var keys: [l4lb_kr_tuple] = [], values: [l4lb_kr_flow] = []
        var keyBuffer = [l4lb_kr_tuple](repeating: l4lb_kr_tuple(), count: batch)
        var valueBuffer = [l4lb_kr_flow](repeating: l4lb_kr_flow(), count: batch)
        var inToken: UInt32 = 0, outToken: UInt32 = 0
        var first = true
        while true {
            var count = UInt32(batch)
            let rc = first
                ? bpf_map_lookup_batch(fd, nil, &outToken, &keyBuffer, &valueBuffer, &count, nil)
                : bpf_map_lookup_batch(fd, &inToken, &outToken, &keyBuffer, &valueBuffer, &count, nil)
            let failure = rc != 0 ? errno : 0
            first = false
            keys += keyBuffer.prefix(Int(count))
            values += valueBuffer.prefix(Int(count))
            // ENOENT: the walk is done. ENOSPC: a bucket holds more than a batch (cannot
            // happen at 8,192): stop and let the next pass go on.
            if rc != 0 || failure != 0 { break }
            inToken = outToken
        }
        return (keys, values)
    }

    /// CLOCK_MONOTONIC now, in nanoseconds: the program's `bpf_ktime_get_ns`.
    public static func monotonicNanoseconds() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }
}

/// A flow table key as a hashable value (its 40 bytes), for finding pairs in a batch read.
struct FlowKey: Hashable {
    let words: (UInt64, UInt64, UInt64, UInt64, UInt64)

    init(_ key: l4lb_kr_tuple) {
        words = withUnsafeBytes(of: key) { raw in
            (raw.load(fromByteOffset: 0, as: UInt64.self), raw.load(fromByteOffset: 8, as: UInt64.self),
             raw.load(fromByteOffset: 16, as: UInt64.self), raw.load(fromByteOffset: 24, as: UInt64.self),
             raw.load(fromByteOffset: 32, as: UInt64.self))
        }
    }

    static func == (a: FlowKey, b: FlowKey) -> Bool { a.words == b.words }

    /// The five words folded into one first: the sweep hashes every key of a table that
    /// may hold millions, and SipHash over one word costs a fifth of it over five.
    func hash(into hasher: inout Hasher) {
        let k: UInt64 = 0x9E37_79B9_7F4A_7C15
        let folded = ((((words.0 &* k ^ words.1) &* k ^ words.2) &* k ^ words.3) &* k ^ words.4) &* k
        hasher.combine(folded)
    }
}
