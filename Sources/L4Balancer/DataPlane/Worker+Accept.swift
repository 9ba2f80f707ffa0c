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
            listener: listeners[listener].fd, userData: UserData.listener(.accept, listener, serial: listeners[listener].serial).raw)
        if !listeners[listener].armed { stats.add(.submissionDrops) }
    }

    func accepted(_ completion: Completion, listener: Int, serial: UInt32) {
        // A retired socket's last completions (its listener was removed or rebound).
        let live = listeners.isLive(listener, serial: serial)
        if !completion.hasMore, live {
            listeners[listener].armed = false
            // Re-arm at once after a normal end; after an error, at the next tick.
            if completion.result >= 0, !draining { armAccept(listener) }
        }
        if let error = completion.error {
            // Cancelled or shut down: the listener is being retired.
            if live, error != .canceled, error != .invalidArgument {
                stats.add(.acceptErrors, listener: listener)
                noteResourceError(error, while: "accepting")
            }
            return
        }
        let fd = completion.result
        guard live, !draining else {
            refuse(fd, listener: listener)
            return
        }
        let plan = plans.current
        guard let admission = admit(fd, listener: listener, plan: plan) else { return }
        guard let slot = slab.allocate() else {
            withdraw(admission, listener: listener, plan: plan)
            refuse(fd, listener: listener)
            return
        }
        open(slot, client: fd, listener: listener, plan: plan, admission: admission)
    }

    /// What admitting a connection took, to be given back if it goes no further.
    struct Admission {
        /// The source-table slot + 1 of a `max_connections` place, or 0.
        var sourcePlace: UInt32
        /// A place in the listener's `max_connections`.
        var listenerLimited: Bool
        var cluster: Int
        /// A place in the cluster's `max_connections` (not for clusters routed by name).
        var clusterAdmitted: Bool
        /// Routed by server name: the cluster is known once the ClientHello is read.
        var routed: Bool
    }

    /// Admission of accepted socket `fd`: the user-space blocklist, the per-source rate
    /// limit, the listener's and the cluster's `max_connections`. Nil when refused (the
    /// socket is then closed and counted).
    @inline(__always)
    func admit(_ fd: Int32, listener: Int, plan: WorkerPlan) -> Admission? {
        var sourcePlace: UInt32 = 0
        if sourceFilter.enforcing || plan.rateRules[listener] != nil {
            guard let place = admitSource(fd, listener: listener, plan: plan) else { return nil }
            sourcePlace = place
        }
        let maximum = plan.listenerLimits[listener]
        if let maximum, !shared.limits.admit(listener, maximum: maximum) {
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            return nil
        }
        let cluster = plan.clusterSplits[listener].flatMap { plan.listenerClusters[listener][$0.pick()!] } ?? plan.listenerClusters[listener][0]
        let routed = plan.routes[listener] != nil
        let clusterLimit = routed ? nil : plan.clusterLimits[cluster]
        var admission = Admission(
            sourcePlace: sourcePlace, listenerLimited: maximum != nil, cluster: cluster,
            clusterAdmitted: false, routed: routed)
        if let clusterLimit {
            guard shared.status.admit(cluster: plan.clusterIDs[cluster], limit: clusterLimit) else {
                // Circuit breaking: the cluster is at max_connections.
                withdraw(admission, listener: listener, plan: plan)
                refuse(fd, listener: listener)
                stats.add(.clusterFull, listener: listener)
                return nil
            }
            admission.clusterAdmitted = true
        }
        return admission
    }

    /// The blocklist and the per-source rate limit for `fd`'s peer: its source-table place
    /// (0 for none), or nil when it was dropped or refused.
    func admitSource(_ fd: Int32, listener: Int, plan: WorkerPlan) -> UInt32? {
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
                return nil
            }
        }
        guard let rule = plan.rateRules[listener], rule.limitsNewSources else { return 0 }
        let place = withUnsafeBytes(of: &peer) { admitNewSource($0.baseAddress!, rule, listener: listener) }
        if place == Worker.limitedVerdict {
            refuse(fd, listener: listener)
            return nil
        }
        return place
    }

    /// Gives back the places `admission` took.
    func withdraw(_ admission: Admission, listener: Int, plan: WorkerPlan) {
        if admission.clusterAdmitted { shared.status.leave(cluster: plan.clusterIDs[admission.cluster]) }
        if admission.listenerLimited { shared.limits.leave(listener) }
        leaveSource(admission.sourcePlace)
    }

    /// Fills slot `slot`'s record for an admitted connection and starts it: a connect, a
    /// TLS handshake, or reading the ClientHello for routing.
    @inline(__always)
    func open(_ slot: UInt32, client fd: Int32, listener: Int, plan: WorkerPlan, admission: Admission) {
        let record = slab[slot]
        record.pointee.move(to: .connecting)
        record.pointee.plan = plan.index
        plan.connections += 1
        record.pointee.listener = UInt16(listener)
        record.pointee.client = fd
        record.pointee.counted = true
        record.pointee.listenerLimited = admission.listenerLimited
        record.pointee.clusterAdmitted = admission.clusterAdmitted
        if admission.sourcePlace != 0 {
            record.pointee.holds.insert(.sourcePlace)
            side.sourcePlaces[Int(slot)] = admission.sourcePlace
        }
        record.pointee.lastActivity = clock.tick
        let cluster = admission.cluster
        record.pointee.cluster = UInt16(cluster)
        if !admission.routed, plan.balancers[cluster].usesFlowHash {
            record.pointee.flowHash = FlowHash.compute(client: fd, key: plan.hashKeys[cluster])
        }
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        if side.access != nil { noteAccepted(slot, client: fd) }
        startTimers(slot, listener: listener)
        if admission.routed {
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
