#if canImport(Glibc)
import Glibc
#endif

/// Reload on the worker's side: adopting a published snapshot as a new plan, serving its
/// listeners, and freeing older plans once their last connection has closed.
extension Worker {
    /// Makes `snapshot` the plan new connections are opened under. Connections already
    /// open keep theirs; listeners it no longer has stop accepting at once.
    func adopt(_ snapshot: Snapshot) {
        // 65,535 plans alive at once: keep the current one until older ones close.
        guard let previous = plans.adopt(snapshot, worker: control.index) else { return }
        serve(snapshot)
        reclaimRelayedSessions()
        if previous.connections == 0 { plans.free(previous) }
        publishPlans()
        logger.debug("worker adopted snapshot", metadata: [
            "worker": "\(control.index)", "generation": "\(snapshot.generation)", "plans": "\(plans.liveCount)",
        ])
    }

    /// Accepts on every listener of `snapshot` with the sockets the control plane opened
    /// for this worker; retires the sockets of listeners it no longer has (or whose
    /// address changed).
    func serve(_ snapshot: Snapshot) {
        let sockets = snapshot.listenerSockets.isEmpty ? [] : snapshot.listenerSockets[control.index]
        var served: [Int] = []
        for (i, listener) in snapshot.listeners.enumerated() where i < sockets.count {
            let id = listener.id
            let fd = sockets[i]
            if listeners[id].fd != fd {
                if listeners[id].fd >= 0 { retireListener(id) }
                listeners.bind(id, fd: fd, isDatagram: listener.transport == .udp)
                armAccept(id)
            }
            served.append(id)
        }
        for id in listeners.served where !served.contains(id) {
            retireListener(id)
            // Its connections finish, but within drain_timeout.
            listeners.removed.append((
                listener: id, generation: snapshot.generation,
                deadline: clock.milliseconds + snapshot.config.drainTimeout.milliseconds))
        }
        listeners.served = served
    }

    /// Stops accepting on listener `id` at once: the socket is shut down (it leaves the
    /// SO_REUSEPORT group, and new SYNs to it are refused once no worker has it) and its
    /// accept cancelled; it is closed when the cancel completes (`listenerCancelled`), or
    /// now when there is nothing to cancel.
    func retireListener(_ id: Int) {
        let fd = listeners[id].fd
        guard fd >= 0 else { return }
        // A UDP listener's sessions answer through its socket: they end with it.
        if listeners[id].isDatagram {
            while let session = datagrams.sessions.oldest(id) { endSession(session, reason: .drain) }
        }
        // A listening socket always shuts down; if not, the cancel below still stops it.
        try? SocketCalls.shutdown(fd, Int32(SHUT_RDWR))
        if listeners[id].armed, ring.prepareCancelAll(fd: fd, userData: UserData.retiring(fd).raw) {
            listeners.retiring.insert(fd)
        } else {
            // Nothing refers to the descriptor by number: the shut-down accept (if any)
            // ends by itself and holds its own reference to the socket.
            Glibc.close(fd)
        }
        listeners[id].armed = false
        listeners[id].fd = -1
    }

    func listenerCancelled(fd: Int32) {
        guard listeners.retiring.remove(fd) != nil else { return }
        Glibc.close(fd)
    }

    /// Closes what is still open on listeners removed more than `drain_timeout` ago
    /// (connections opened before the removal; a listener of the same name added back
    /// later keeps its own).
    func closeExpiredRemovedListeners() {
        guard listeners.removed.contains(where: { $0.deadline <= clock.milliseconds }) else { return }
        let due = listeners.removed.filter { $0.deadline <= clock.milliseconds }
        listeners.removed.removeAll { $0.deadline <= clock.milliseconds }
        for index in 0..<slab.highWater {
            let record = slab[UInt32(index)]
            let state = record.pointee.state
            guard state != .free, state != .closing else { continue }
            let listener = Int(record.pointee.listener)
            let generation = plans[record.pointee.plan].snapshot.generation
            guard due.contains(where: { $0.listener == listener && generation < $0.generation }) else { continue }
            stats.add(.drainTimeouts, listener: listener)
            close(UInt32(index), reason: .drain)
        }
    }

    /// A connection of `plan` was released.
    @inline(__always)
    func release(plan index: UInt16) {
        let plan = plans[index]
        plan.connections -= 1
        if plan.connections == 0, plan !== plans.current {
            plans.free(plan)
            publishPlans()
        }
    }

    /// What `/stats` shows of this worker's plans; and whether any live plan closes
    /// connections to endpoints that turn unhealthy.
    func publishPlans() {
        var oldest = plans.current.snapshot.generation
        var closes = false
        for plan in plans.live {
            oldest = min(oldest, plan.snapshot.generation)
            closes = closes || plan.closesOnUnhealthy
        }
        plans.closesOnUnhealthy = closes
        stats.set(.adoptedGeneration, plans.current.snapshot.generation)
        stats.set(.livePlans, UInt64(plans.liveCount))
        stats.set(.oldestPlanGeneration, oldest)
    }
}
