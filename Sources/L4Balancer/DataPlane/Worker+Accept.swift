import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// Accepting TCP connections: multishot accept per listener, admission (limits, filter,
/// rate limits), a slab record, and the start of its connect, TLS handshake or inspection.
extension Worker {
    /// Not armed when the submission queue stays full: the next tick tries again.
    /// `listener` is the listener's identity; the completion carries its socket's serial.
    func armAccept(_ listener: Int) {
        if listeners[listener].isDatagram {
            armDatagrams(listener)
            return
        }
        listeners[listener].armed = ring.prepareMultishotAccept(
            listener: listeners[listener].fd, userData: UserData(.accept, slot: UInt32(listener), generation: listeners[listener].serial).raw)
        if !listeners[listener].armed { stats.add(.submissionDrops) }
    }

    func accepted(_ completion: Completion, listener: Int, serial: UInt32) {
        // A retired socket's last loop.completions (its listener was removed or rebound).
        let live = listeners.isLive(listener, serial: serial)
        if !completion.hasMore, live {
            listeners[listener].armed = false
            // Re-arm at once after a normal end; after an error, at the next tick.
            if completion.result >= 0, !draining { armAccept(listener) }
        }
        guard completion.result >= 0 else {
            if live, completion.result != -ECANCELED, completion.result != -EINVAL {
                stats.add(.acceptErrors, listener: listener)
                noteResourceError(-completion.result, while: "accepting")
            }
            return
        }
        let fd = completion.result
        guard live, !draining else {
            refuse(fd, listener: listener)
            return
        }
        let plan = plans.current
        let rule = plan.rateRules[listener]
        var sourcePlace: UInt32 = 0
        if sourceFilter.enforcing || rule != nil {
            var peer = sockaddr_storage()
            // A peer the kernel cannot name (it reset already) has no source to limit.
            let known = SourceFilter.peer(of: fd, into: &peer)
            if !known { peer.ss_family = sa_family_t(AF_UNSPEC) }
            if sourceFilter.enforcing {
                // The user-space blocklist: closed before any byte reaches an upstream.
                let verdict = known ? sourceFilter.verdict(source: &peer, port: plan.listenerPorts[listener], transport: .tcp) : .malformed
                stats.add(.filterCounter(verdict))
                if verdict.drops {
                    Glibc.close(fd)
                    return
                }
            }
            if let rule, rule.limitsNewSources {
                sourcePlace = withUnsafeBytes(of: &peer) { admitNewSource($0.baseAddress!, rule, listener: listener) }
                if sourcePlace == Worker.limitedVerdict {
                    refuse(fd, listener: listener)
                    return
                }
            }
        }
        let maximum = plan.listenerLimits[listener]
        let limited = maximum != nil
        if let maximum, !shared.limits.admit(listener, maximum: maximum) {
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            return
        }
        let cluster = plan.clusterSplits[listener].flatMap { plan.listenerClusters[listener][$0.pick()!] } ?? plan.listenerClusters[listener][0]
        let clusterID = plan.clusterIDs[cluster]
        // Routed by server name: the cluster is known once the ClientHello is read.
        let routed = plan.routes[listener] != nil
        let clusterLimit = routed ? nil : plan.clusterLimits[cluster]
        if let clusterLimit, !shared.status.admit(cluster: clusterID, limit: clusterLimit) {
            // Circuit breaking: the cluster is at max_connections.
            if limited { shared.limits.leave(listener) }
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            stats.add(.clusterFull, listener: listener)
            return
        }
        guard let slot = slab.allocate() else {
            if clusterLimit != nil { shared.status.leave(cluster: clusterID) }
            if limited { shared.limits.leave(listener) }
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            return
        }
        let record = slab[slot]
        record.pointee.move(to: .connecting)
        record.pointee.plan = plan.index
        plan.connections += 1
        record.pointee.listener = UInt16(listener)
        record.pointee.client = fd
        record.pointee.counted = true
        record.pointee.listenerLimited = limited
        record.pointee.clusterAdmitted = clusterLimit != nil
        if sourcePlace != 0 {
            record.pointee.holds.insert(.sourcePlace)
            side.sourcePlaces[Int(slot)] = sourcePlace
        }
        record.pointee.lastActivity = clock.tick
        record.pointee.cluster = UInt16(cluster)
        if !routed, plan.balancers[cluster].usesFlowHash {
            record.pointee.flowHash = FlowHash.compute(client: fd, key: plan.hashKeys[cluster])
        }
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        if side.access != nil { noteAccepted(slot, client: fd) }
        startTimers(slot, listener: listener)
        if routed {
            startInspecting(slot, record)
            return
        }
        if plan.isTLS[listener] {
            guard let context = plan.tlsContexts[listener] else {
                close(slot, reason: .error)
                return
            }
            startHandshake(slot, record, context: context)
            return
        }
        startConnect(slot)
    }
}
