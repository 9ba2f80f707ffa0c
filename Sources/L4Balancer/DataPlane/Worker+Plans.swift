#if canImport(Glibc)
import Glibc
#endif

/// Reload on the worker's side: adopting a published snapshot as a new plan, serving its
/// listeners, and freeing older plans once their last connection has closed.
extension Worker {
    /// Makes `snapshot` the plan new connections are opened under. Connections already
    /// open keep theirs; listeners it no longer has stop accepting at once.
    func adopt(_ snapshot: Snapshot) {
        let index: UInt16
        if let free = freePlanIndices.popLast() {
            index = free
        } else if plans.count < Int(UInt16.max) {
            index = UInt16(plans.count)
            plans.append(nil)
        } else {
            // 65,535 plans alive at once: keep the current one until older ones close.
            return
        }
        let plan = WorkerPlan(snapshot: snapshot, index: index, worker: control.index, previous: current, sessions: upstreamSessions)
        plans[Int(index)] = plan
        let previous = current
        current = plan
        livePlanCount += 1
        serve(snapshot)
        reclaimRelayedSessions()
        if previous.connections == 0 { free(previous) }
        publishPlans()
        logger.debug("worker adopted snapshot", metadata: [
            "worker": "\(control.index)", "generation": "\(snapshot.generation)", "plans": "\(livePlanCount)",
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
            if listenerFDs[id] != fd {
                if listenerFDs[id] >= 0 { retireListener(id) }
                listenerFDs[id] = fd
                listenerIsDatagram[id] = listener.transport == .udp
                listenerSerials[id] = (listenerSerials[id] &+ 1) & 0xFF_FFFF
                armAccept(id)
            }
            served.append(id)
        }
        for id in servedListeners where !served.contains(id) {
            retireListener(id)
            // Its connections finish, but within drain_timeout.
            removedListeners.append((
                listener: id, generation: snapshot.generation,
                deadline: nowMilliseconds + snapshot.config.drainTimeout.milliseconds))
        }
        servedListeners = served
    }

    /// Stops accepting on listener `id` at once: the socket is shut down (it leaves the
    /// SO_REUSEPORT group, and new SYNs to it are refused once no worker has it) and its
    /// accept cancelled; it is closed when the cancel completes (`listenerCancelled`), or
    /// now when there is nothing to cancel.
    func retireListener(_ id: Int) {
        let fd = listenerFDs[id]
        guard fd >= 0 else { return }
        // A UDP listener's sessions answer through its socket: they end with it.
        if listenerIsDatagram[id] {
            while let session = udpSessions.oldest(id) { endSession(session, reason: .drain) }
        }
        shutdown(fd, Int32(SHUT_RDWR))
        if acceptArmed[id], ring.prepareCancelAll(fd: fd, userData: UserData(.listenerCancelled, slot: UInt32(bitPattern: fd)).raw) {
            retiringListenerFDs.insert(fd)
        } else {
            // Nothing refers to the descriptor by number: the shut-down accept (if any)
            // ends by itself and holds its own reference to the socket.
            Glibc.close(fd)
        }
        acceptArmed[id] = false
        listenerFDs[id] = -1
    }

    func listenerCancelled(fd: Int32) {
        guard retiringListenerFDs.remove(fd) != nil else { return }
        Glibc.close(fd)
    }

    /// Closes what is still open on listeners removed more than `drain_timeout` ago
    /// (connections opened before the removal; a listener of the same name added back
    /// later keeps its own).
    func closeExpiredRemovedListeners() {
        guard removedListeners.contains(where: { $0.deadline <= nowMilliseconds }) else { return }
        let due = removedListeners.filter { $0.deadline <= nowMilliseconds }
        removedListeners.removeAll { $0.deadline <= nowMilliseconds }
        for index in 0..<slab.highWater {
            let record = slab[UInt32(index)]
            let state = record.pointee.state
            guard state != .free, state != .closing else { continue }
            let listener = Int(record.pointee.listener)
            let generation = plans[Int(record.pointee.plan)].unsafelyUnwrapped.snapshot.generation
            guard due.contains(where: { $0.listener == listener && generation < $0.generation }) else { continue }
            stats.add(.drainTimeouts, listener: listener)
            close(UInt32(index), reason: .drain)
        }
    }

    /// A connection of `plan` was released.
    @inline(__always)
    func release(plan index: UInt16) {
        let plan = plans[Int(index)].unsafelyUnwrapped
        plan.connections -= 1
        if plan.connections == 0, plan !== current {
            free(plan)
            publishPlans()
        }
    }

    func free(_ plan: WorkerPlan) {
        plans[Int(plan.index)] = nil
        freePlanIndices.append(plan.index)
        livePlanCount -= 1
    }

    /// What `/stats` shows of this worker's plans; and whether any live plan closes
    /// connections to endpoints that turn unhealthy.
    func publishPlans() {
        var oldest = current.snapshot.generation
        var closes = false
        for case let plan? in plans {
            oldest = min(oldest, plan.snapshot.generation)
            closes = closes || plan.closesOnUnhealthy
        }
        closesOnUnhealthy = closes
        stats.set(.adoptedGeneration, current.snapshot.generation)
        stats.set(.livePlans, UInt64(livePlanCount))
        stats.set(.oldestPlanGeneration, oldest)
    }
}
