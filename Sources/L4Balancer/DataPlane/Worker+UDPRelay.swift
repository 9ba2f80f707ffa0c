import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// A session the kernel carries: its two flows (client → listener, and endpoint →
/// upstream socket, as the datagrams arrive), in the table of whichever program carries
/// it, and the counts already folded into the worker's stats.
struct RelayedSession {
    /// Where the two flows are: the `lo` relay's table, or the kernel forwarder's (a
    /// listener away from loopback), whose program also routes and redirects them.
    enum Table {
        case loopback(UDPRelayFlows, forward: UDPRelayTuple, reverse: UDPRelayTuple)
        case forwarder(KernelRelay, forward: KernelRelayTuple, reverse: KernelRelayTuple)
    }

    let table: Table
    var foldedIn = RelayedCounts()
    var foldedOut = RelayedCounts()

    /// What the kernel has counted so far on each direction (nil: not installed).
    func counts() -> (inbound: RelayedCounts?, outbound: RelayedCounts?) {
        switch table {
        case .loopback(let flows, let forward, let reverse):
            (flows.counters(forward).map(RelayedCounts.init), flows.counters(reverse).map(RelayedCounts.init))
        case .forwarder(let relay, let forward, let reverse):
            (relay.counters(forward).map(RelayedCounts.init), relay.counters(reverse).map(RelayedCounts.init))
        }
    }

    /// Removes both flows, the client's first (nothing more is rewritten towards the
    /// endpoint once its count is read), returning their last counts.
    func take() -> (inbound: RelayedCounts?, outbound: RelayedCounts?) {
        switch table {
        case .loopback(let flows, let forward, let reverse):
            let inbound = flows.take(forward).map(RelayedCounts.init)
            return (inbound, flows.take(reverse).map(RelayedCounts.init))
        case .forwarder(let relay, let forward, let reverse):
            let inbound = relay.take(forward).map(RelayedCounts.init)
            return (inbound, relay.take(reverse).map(RelayedCounts.init))
        }
    }
}

/// One direction's datagrams, payload bytes and last datagram (CLOCK_MONOTONIC ns; 0:
/// none), as either program counts them.
struct RelayedCounts {
    var datagrams: UInt64 = 0
    var bytes: UInt64 = 0
    var lastNanoseconds: UInt64 = 0

    init() {}
    init(_ c: UDPRelayFlows.Counters) { (datagrams, bytes, lastNanoseconds) = (c.datagrams, c.bytes, c.lastNanoseconds) }
    init(_ c: KernelRelay.Counters) { (datagrams, bytes, lastNanoseconds) = (c.packets, c.bytes, c.lastNanoseconds) }
}

/// `relay: kernel` on udp listeners: once a session's first datagram has picked its
/// endpoint, the worker installs its two flows, and the kernel rewrites every later
/// datagram both ways without waking the worker. The session stays in the table as
/// before — its upstream socket open (ICMP port unreachable still ends it, and a reply
/// too big for one packet, reassembled by the stack, reaches it), its idle expiry and
/// eviction as before — and what the kernel carried is folded into the stats once a
/// second, when the session looks idle, and when it ends.
///
/// On a loopback listener the `lo` relay (bpf/udp_relay.bpf.c) takes sessions whose
/// client, listener and endpoint are all loopback addresses of one family; on any other
/// address the kernel forwarder (bpf/kernel_relay.bpf.c) takes them, with the session
/// socket's address and port as the NAT source toward the endpoint, and routes each
/// datagram to its egress interface. Datagrams a program passes up (fragments, IP
/// options) still reach the worker, which relays them as any other.
extension Worker {
    /// Relayed sessions folded per second at most (each is two bpf(2) lookups); beyond
    /// it, a share of them each second, so every one is folded within a few seconds.
    static let relayFoldsPerSecond = 2048

    /// Hands session `slot` to the kernel, if its addresses allow and the table has room
    /// (a full table leaves it in user space, counted).
    func relayInKernel(_ slot: UInt32, listener: Int, endpoint: UnsafeRawPointer) {
        guard !sourceFilter.enforcing else { return }
        var listenerName = sockaddr_in6(), upstreamName = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let named = withUnsafeMutableBytes(of: &listenerName) {
            getsockname(listeners[listener].fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) == 0
        }
        length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        guard named, withUnsafeMutableBytes(of: &upstreamName, {
            getsockname(datagrams.sessions[slot].upstream, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) == 0
        }) else { return }
        var client = datagrams.sessions[slot].client
        let table: RelayedSession.Table
        if plans.current.kernelRelay[listener] == .forwarder, let relay = plans.current.snapshot.forwarder {
            guard let forward = KernelRelayTuple(.udp, source: &client, destination: &listenerName),
                  let forwardTo = KernelRelayTuple(.udp, source: &upstreamName, destination: endpoint),
                  let reverse = KernelRelayTuple(.udp, source: endpoint, destination: &upstreamName),
                  let reverseTo = KernelRelayTuple(.udp, source: &listenerName, destination: &client),
                  forward.family == forwardTo.family
            else { return }
            // The reverse flow first: the reply to the datagram about to be sent must find it.
            guard relay.install(reverse, rewrite: reverseTo, listener: listener, session: true) == 0 else {
                stats.add(.kernelFallbacks, listener: listener)
                return
            }
            guard relay.install(forward, rewrite: forwardTo, listener: listener, session: true) == 0 else {
                _ = relay.take(reverse)
                stats.add(.kernelFallbacks, listener: listener)
                return
            }
            table = .forwarder(relay, forward: forward, reverse: reverse)
        } else {
            guard let flows = plans.current.snapshot.relayFlows,
                  let forward = UDPRelayTuple(source: &client, destination: &listenerName),
                  let forwardTo = UDPRelayTuple(source: &upstreamName, destination: endpoint),
                  let reverse = UDPRelayTuple(source: endpoint, destination: &upstreamName),
                  let reverseTo = UDPRelayTuple(source: &listenerName, destination: &client),
                  forward.family == forwardTo.family
            else { return }
            guard flows.install(reverse, rewrite: reverseTo) == 0 else {
                stats.add(.kernelFallbacks, listener: listener)
                return
            }
            guard flows.install(forward, rewrite: forwardTo) == 0 else {
                flows.remove(reverse)
                stats.add(.kernelFallbacks, listener: listener)
                return
            }
            table = .loopback(flows, forward: forward, reverse: reverse)
        }
        datagrams.relayed[slot] = RelayedSession(table: table)
        datagrams.sessions[slot].relayed = true
        stats.add(.kernelSessions, listener: listener)
    }

    /// Folds what the kernel carried for `slot` since the last fold into the stats; the
    /// tick of its last datagram either way, nil when it has carried none.
    @discardableResult
    func foldRelayed(_ slot: UInt32) -> UInt32? {
        guard let relayed = datagrams.relayed[slot] else { return nil }
        let counts = relayed.counts()
        return fold(slot, relayed, inbound: counts.inbound, outbound: counts.outbound)
    }

    /// Takes session `slot` back from the kernel (it ends, or may no longer be relayed
    /// there): its flows are removed and their last counts folded in.
    func endRelay(_ slot: UInt32) {
        guard datagrams.sessions[slot].relayed, let relayed = datagrams.relayed.removeValue(forKey: slot) else { return }
        datagrams.sessions[slot].relayed = false
        let counts = relayed.take()
        fold(slot, relayed, inbound: counts.inbound, outbound: counts.outbound)
    }

    @discardableResult
    private func fold(_ slot: UInt32, _ relayed: RelayedSession, inbound: RelayedCounts?, outbound: RelayedCounts?) -> UInt32? {
        var updated = relayed
        if let inbound, inbound.datagrams > relayed.foldedIn.datagrams {
            add(inbound, since: relayed.foldedIn, replies: false, slot)
            updated.foldedIn = inbound
        }
        if let outbound, outbound.datagrams > relayed.foldedOut.datagrams {
            add(outbound, since: relayed.foldedOut, replies: true, slot)
            updated.foldedOut = outbound
        }
        if datagrams.sessions[slot].relayed { datagrams.relayed[slot] = updated }
        let last = max(updated.foldedIn.lastNanoseconds, updated.foldedOut.lastNanoseconds)
        guard last > 0 else { return nil }
        // The kernel's clock is CLOCK_MONOTONIC, the worker's the coarse one (a few ms behind).
        let ticks = max(Int64(last / 1_000_000) - clock.start, 0) / Worker.tickMilliseconds
        return min(UInt32(truncatingIfNeeded: ticks), clock.tick)
    }

    /// One direction's new datagrams and bytes, counted as the worker counts its own: the
    /// client's (`replies` false) or the endpoint's replies.
    private func add(_ counters: RelayedCounts, since folded: RelayedCounts, replies outbound: Bool, _ slot: UInt32) {
        let listener = Int(datagrams.sessions[slot].listener), endpoint = Int(datagrams.sessions[slot].endpoint)
        let count = counters.datagrams - folded.datagrams, bytes = counters.bytes &- folded.bytes
        stats.add(outbound ? .datagramsOut : .datagramsIn, listener: listener, count)
        stats.add(outbound ? .kernelDatagramsOut : .kernelDatagramsIn, listener: listener, count)
        stats.add(outbound ? .bytesOut : .bytesIn, listener: listener, bytes)
        stats.add(outbound ? .bytesIn : .bytesOut, endpoint: endpoint, bytes)
        if outbound {
            datagrams.sessions[slot].bytesFromUpstream &+= bytes
            datagrams.sessions[slot].replies &+= UInt32(truncatingIfNeeded: count)
        } else {
            datagrams.sessions[slot].bytesFromClient &+= bytes
            datagrams.sessions[slot].requests &+= UInt32(truncatingIfNeeded: count)
        }
    }

    /// Folds `slot`'s kernel counts and, when the kernel carried a datagram after the
    /// session's last activity, moves it up to that tick in the idle order. True if moved.
    @discardableResult
    func moveUpToKernelActivity(_ slot: UInt32) -> Bool {
        guard let last = foldRelayed(slot), Int32(bitPattern: last &- datagrams.sessions[slot].lastTick) > 0 else { return false }
        datagrams.sessions.touch(slot, tick: last)
        return true
    }

    /// Once a second: relayed sessions' counts into the stats (all of them, or a share
    /// when there are more than `relayFoldsPerSecond`), and their place in the idle order
    /// moved up to their last datagram, so `max_sessions` evicts the longest idle.
    func relayedActivityTick() {
        guard clock.tick &- datagrams.lastRelayFoldTick >= UInt32(1000 / Worker.tickMilliseconds) else { return }
        datagrams.lastRelayFoldTick = clock.tick
        let shares = UInt32((datagrams.relayed.count + Worker.relayFoldsPerSecond - 1) / Worker.relayFoldsPerSecond)
        datagrams.relayFoldPhase = (datagrams.relayFoldPhase &+ 1) % shares
        // The slots first: folding writes to the dictionary, which must not be copied.
        datagrams.relayFoldSlots.removeAll(keepingCapacity: true)
        for slot in datagrams.relayed.keys where slot % shares == datagrams.relayFoldPhase { datagrams.relayFoldSlots.append(slot) }
        for slot in datagrams.relayFoldSlots { moveUpToKernelActivity(slot) }
    }

    /// The session `max_sessions` evicts on `listener`: the longest idle, counting what
    /// the kernel carried (a relayed session at the head that has had datagrams since its
    /// last fold moves back first).
    func longestIdleSession(_ listener: Int) -> UInt32? {
        var checked = 0
        while let oldest = datagrams.sessions.oldest(listener), datagrams.sessions[oldest].relayed, checked < datagrams.sessions.counts[listener],
              moveUpToKernelActivity(oldest) {
            checked += 1
        }
        return datagrams.sessions.oldest(listener)
    }

    /// Takes back the sessions the kernel may no longer carry: their listener's plan no
    /// longer relays in the kernel, or the blocklist is enforced in user space (every
    /// datagram must pass it).
    func reclaimRelayedSessions() {
        guard !datagrams.relayed.isEmpty else { return }
        let plan = plans.current
        let all = sourceFilter.enforcing
        let slots = datagrams.relayed.keys.filter { slot in
            let listener = Int(datagrams.sessions[slot].listener)
            return all || listener >= plan.kernelRelay.count || plan.kernelRelay[listener] == nil
        }
        for slot in slots { endRelay(slot) }
    }
}
