import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// A session the kernel's relay carries: its two flows (client → listener, and endpoint
/// → upstream socket, as the datagrams arrive on `lo`), and the counts already folded
/// into the worker's stats.
struct RelayedSession {
    let flows: UDPRelayFlows
    let forward: UDPRelayTuple
    let reverse: UDPRelayTuple
    var foldedIn = UDPRelayFlows.Counters()
    var foldedOut = UDPRelayFlows.Counters()
}

/// `relay: kernel` (bpf/udp_relay.bpf.c): once a session's first datagram has picked its
/// endpoint, the worker installs its two flows, and the kernel rewrites every later
/// datagram both ways without waking the worker. The session stays in the table as
/// before — its upstream socket open (ICMP port unreachable still ends it), its idle
/// expiry and eviction as before — and what the kernel carried is folded into the stats
/// once a second, when the session looks idle, and when it ends.
///
/// Only sessions whose client, listener and endpoint are all loopback addresses of one
/// family are handed over (the program sits on `lo` and rewrites in place), on a listener
/// bound to one address. Datagrams the program passes up (IPv6 fragments) still reach the
/// worker, which relays them as any other.
extension Worker {
    /// Relayed sessions folded per second at most (each is two bpf(2) lookups); beyond
    /// it, a share of them each second, so every one is folded within a few seconds.
    static let relayFoldsPerSecond = 2048

    /// Hands session `slot` to the kernel, if its addresses allow and the table has room
    /// (a full table leaves it in user space, counted).
    func relayInKernel(_ slot: UInt32, listener: Int, endpoint: UnsafeRawPointer) {
        guard let flows = current.snapshot.relayFlows, !sourceFilter.enforcing else { return }
        var listenerName = sockaddr_in6(), upstreamName = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let named = withUnsafeMutableBytes(of: &listenerName) {
            getsockname(listenerFDs[listener], $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) == 0
        }
        length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        guard named, withUnsafeMutableBytes(of: &upstreamName, {
            getsockname(udpSessions[slot].upstream, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) == 0
        }) else { return }
        var client = udpSessions[slot].client
        guard let forward = UDPRelayTuple(source: &client, destination: &listenerName),
              let forwardTo = UDPRelayTuple(source: &upstreamName, destination: endpoint),
              let reverse = UDPRelayTuple(source: endpoint, destination: &upstreamName),
              let reverseTo = UDPRelayTuple(source: &listenerName, destination: &client),
              forward.family == forwardTo.family
        else { return }
        // The reverse flow first: the reply to the datagram about to be sent must find it.
        guard flows.install(reverse, rewrite: reverseTo) == 0 else {
            stats.add(.kernelFallbacks, listener: listener)
            return
        }
        guard flows.install(forward, rewrite: forwardTo) == 0 else {
            flows.remove(reverse)
            stats.add(.kernelFallbacks, listener: listener)
            return
        }
        relayedSessions[slot] = RelayedSession(flows: flows, forward: forward, reverse: reverse)
        udpSessions[slot].relayed = true
        stats.add(.kernelSessions, listener: listener)
    }

    /// Folds what the kernel carried for `slot` since the last fold into the stats; the
    /// tick of its last datagram either way, nil when it has carried none.
    @discardableResult
    func foldRelayed(_ slot: UInt32) -> UInt32? {
        guard let relayed = relayedSessions[slot] else { return nil }
        return fold(slot, relayed, inbound: relayed.flows.counters(relayed.forward), outbound: relayed.flows.counters(relayed.reverse))
    }

    /// Takes session `slot` back from the kernel (it ends, or may no longer be relayed
    /// there): its flows are removed and their last counts folded in.
    func endRelay(_ slot: UInt32) {
        guard udpSessions[slot].relayed, let relayed = relayedSessions.removeValue(forKey: slot) else { return }
        udpSessions[slot].relayed = false
        // The client's flow first: nothing more is rewritten towards the endpoint once
        // its count is read.
        let inbound = relayed.flows.take(relayed.forward)
        let outbound = relayed.flows.take(relayed.reverse)
        fold(slot, relayed, inbound: inbound, outbound: outbound)
    }

    @discardableResult
    private func fold(_ slot: UInt32, _ relayed: RelayedSession, inbound: UDPRelayFlows.Counters?, outbound: UDPRelayFlows.Counters?) -> UInt32? {
        var updated = relayed
        if let inbound, inbound.datagrams > relayed.foldedIn.datagrams {
            add(inbound, since: relayed.foldedIn, replies: false, slot)
            updated.foldedIn = inbound
        }
        if let outbound, outbound.datagrams > relayed.foldedOut.datagrams {
            add(outbound, since: relayed.foldedOut, replies: true, slot)
            updated.foldedOut = outbound
        }
        if udpSessions[slot].relayed { relayedSessions[slot] = updated }
        let last = max(updated.foldedIn.lastNanoseconds, updated.foldedOut.lastNanoseconds)
        guard last > 0 else { return nil }
        // The kernel's clock is CLOCK_MONOTONIC, the worker's the coarse one (a few ms behind).
        let ticks = max(Int64(last / 1_000_000) - startMilliseconds, 0) / Worker.tickMilliseconds
        return min(UInt32(truncatingIfNeeded: ticks), nowTick)
    }

    /// One direction's new datagrams and bytes, counted as the worker counts its own: the
    /// client's (`replies` false) or the endpoint's replies.
    private func add(_ counters: UDPRelayFlows.Counters, since folded: UDPRelayFlows.Counters, replies outbound: Bool, _ slot: UInt32) {
        let listener = Int(udpSessions[slot].listener), endpoint = Int(udpSessions[slot].endpoint)
        let datagrams = counters.datagrams - folded.datagrams, bytes = counters.bytes &- folded.bytes
        stats.add(outbound ? .datagramsOut : .datagramsIn, listener: listener, datagrams)
        stats.add(outbound ? .kernelDatagramsOut : .kernelDatagramsIn, listener: listener, datagrams)
        stats.add(outbound ? .bytesOut : .bytesIn, listener: listener, bytes)
        stats.add(outbound ? .bytesIn : .bytesOut, endpoint: endpoint, bytes)
        if outbound {
            udpSessions[slot].bytesFromUpstream &+= bytes
            udpSessions[slot].replies &+= UInt32(truncatingIfNeeded: datagrams)
        } else {
            udpSessions[slot].bytesFromClient &+= bytes
            udpSessions[slot].requests &+= UInt32(truncatingIfNeeded: datagrams)
        }
    }

    /// Folds `slot`'s kernel counts and, when the kernel carried a datagram after the
    /// session's last activity, moves it up to that tick in the idle order. True if moved.
    @discardableResult
    func moveUpToKernelActivity(_ slot: UInt32) -> Bool {
        guard let last = foldRelayed(slot), Int32(bitPattern: last &- udpSessions[slot].lastTick) > 0 else { return false }
        udpSessions.touch(slot, tick: last)
        return true
    }

    /// Once a second: relayed sessions' counts into the stats (all of them, or a share
    /// when there are more than `relayFoldsPerSecond`), and their place in the idle order
    /// moved up to their last datagram, so `max_sessions` evicts the longest idle.
    func relayedActivityTick() {
        guard nowTick &- lastRelayFoldTick >= UInt32(1000 / Worker.tickMilliseconds) else { return }
        lastRelayFoldTick = nowTick
        let shares = UInt32((relayedSessions.count + Worker.relayFoldsPerSecond - 1) / Worker.relayFoldsPerSecond)
        relayFoldPhase = (relayFoldPhase &+ 1) % shares
        // The slots first: folding writes to the dictionary, which must not be copied.
        relayFoldSlots.removeAll(keepingCapacity: true)
        for slot in relayedSessions.keys where slot % shares == relayFoldPhase { relayFoldSlots.append(slot) }
        for slot in relayFoldSlots { moveUpToKernelActivity(slot) }
    }

    /// The session `max_sessions` evicts on `listener`: the longest idle, counting what
    /// the kernel carried (a relayed session at the head that has had datagrams since its
    /// last fold moves back first).
    func longestIdleSession(_ listener: Int) -> UInt32? {
        var checked = 0
        while let oldest = udpSessions.oldest(listener), udpSessions[oldest].relayed, checked < udpSessions.counts[listener],
              moveUpToKernelActivity(oldest) {
            checked += 1
        }
        return udpSessions.oldest(listener)
    }

    /// Takes back the sessions the kernel may no longer carry: their listener's plan no
    /// longer relays in the kernel, or the blocklist is enforced in user space (every
    /// datagram must pass it).
    func reclaimRelayedSessions() {
        guard !relayedSessions.isEmpty else { return }
        let plan = current
        let all = sourceFilter.enforcing
        let slots = relayedSessions.keys.filter { slot in
            let listener = Int(udpSessions[slot].listener)
            return all || listener >= plan.kernelRelay.count || !plan.kernelRelay[listener]
        }
        for slot in slots { endRelay(slot) }
    }
}
