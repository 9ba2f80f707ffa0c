import CLinux
import Logging
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The worker's clock and control: the tick (idle, send and connect timeouts on the timer
/// wheel, retries), the wake-up (drain, filter and snapshot changes), closing on shutdown.
extension Worker {
    /// The timer tick and the control plane's wake-up read. Losing either would stop the
    /// timers or leave a drain request unseen, so a refusal is retried every loop.
    func armTick() {
        loop.tickArmed = ring.prepareTimeout(loop.tickTimeout, userData: UserData(.tick).raw)
        if !loop.tickArmed { stats.add(.submissionDrops) }
    }

    func armWake() {
        loop.wakeArmed = ring.prepareRead(fd: control.wakeSignal.fd, into: loop.wakeCounter, length: 8, userData: UserData(.wake).raw)
        if !loop.wakeArmed { stats.add(.submissionDrops) }
    }

    func woken() {
        armWake()
        if !draining, control.drainRequested.load(ordering: .acquiring) { startDrain() }
        let filter = shared.filters.filter
        if filter !== sourceFilter {
            sourceFilter = filter
            // Every datagram must pass the user-space blocklist: the kernel gives its sessions back.
            if filter.enforcing { reclaimRelayedSessions() }
        }
        if !draining {
            let published = shared.store.snapshot
            if published !== plans.current.snapshot { adopt(published) }
        }
    }

    /// Stop accepting: the listening sockets stop listening at once (new SYNs are refused),
    /// established connections carry on.
    func startDrain() {
        drain = .draining
        for id in listeners.served { retireListener(id) }
        listeners.served = []
        logger.debug("worker draining", metadata: ["worker": "\(control.index)", "connections": "\(slab.active)"])
    }

    func ticked() {
        armTick()
        stats.set(.smallBuffersInUse, UInt64(buffers.small.inUse))
        stats.set(.largeBuffersInUse, UInt64(buffers.large.inUse))
        expireConnections()
        if !buffers.retriesAtTick.isEmpty { retryAtTick() }
        if !buffers.inputReleasesAtTick.isEmpty { releaseIdleInputMemory() }
        if datagrams.sessions.active > 0 || !datagrams.repliesToRearm.isEmpty { expireSessions() }
        if !datagrams.relayed.isEmpty { relayedActivityTick() }
        if plans.closesOnUnhealthy { closeConnectionsToUnavailableEndpoints() }
        if !listeners.removed.isEmpty { closeExpiredRemovedListeners() }
        if !draining, shared.store.snapshot !== plans.current.snapshot { adopt(shared.store.snapshot) }
        if draining {
            if drain != .forcing, clock.milliseconds >= control.drainDeadline.load(ordering: .relaxed) {
                drain = .forcing
                closeAll()
            }
        } else {
            // Accepts that stopped on an error (EMFILE and the like) retry once per tick.
            for id in listeners.served where !listeners[id].armed { armAccept(id) }
        }
    }

    /// Whether the connection a tick-time list entry named (`slot` at `generation`) is
    /// still open: not closed, closing, or the slot reused since.
    @inline(__always)
    func stillOpen(_ record: UnsafeMutablePointer<Connection>, generation: UInt32) -> Bool {
        record.pointee.generation == generation && record.pointee.state != .closing && record.pointee.state != .free
    }

    /// Steps that found no free small buffer (a TLS flush, a ClientHello peek), retried
    /// once per tick.
    func retryAtTick() {
        let waiting = buffers.retriesAtTick
        buffers.retriesAtTick.removeAll(keepingCapacity: true)
        for (slot, generation) in waiting {
            let record = slab[slot]
            guard stillOpen(record, generation: generation) else { continue }
            if record.pointee.state == .inspecting {
                peekClientHello(slot, record)
                continue
            }
            if record.pointee.tls { retryTLS(slot, record, generation: generation, atUpstream: false) }
            if record.pointee.upstreamTLS { retryTLS(slot, record, generation: generation, atUpstream: true) }
        }
    }

    /// One TLS side's step that waited for the tick: an unsent ciphertext buffer, the PROXY
    /// v2 header, plaintext OpenSSL holds, or ciphertext to flush.
    private func retryTLS(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, generation: UInt32, atUpstream: Bool) {
        guard stillOpen(record, generation: generation) else { return }
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let state = record.pointee.state
        if t.pointee.cipherUnsent {
            sendCiphertext(slot, record, atUpstream: atUpstream)
        } else if !atUpstream, state == .sendingProxyHeader, t.pointee.headerUnwritten {
            startTLSProxyHeader(slot, record)
        } else if state == .proxying {
            let source = stream(record, toUpstream: !atUpstream).pointee.state
            if source == .receiving || source == .waitingForBuffer { pullPendingPlaintext(slot, record, atUpstream: atUpstream) }
            if record.pointee.state == .proxying { encryptFor(slot, record, atUpstream: atUpstream) }
        } else {
            flushCiphertext(slot, record, atUpstream: atUpstream)
        }
    }

    /// Due timer buckets: each connection in one is closed if it has been idle (no bytes
    /// either way) for `idle_timeout`, or a send of it has made no progress for
    /// `send_timeout`; otherwise it is filed again at its next deadline.
    func expireConnections() {
        while let head = wheel.takeNextDueBucket(now: clock.tick) {
            var cursor = head
            while let slot = wheel.next(&cursor, in: slab) {
                let record = slab[slot]
                let state = record.pointee.state
                guard state != .free, state != .closing else { continue }
                let listener = Int(record.pointee.listener)
                switch timerCheck(record, plan: plans[record.pointee.plan], listener: listener) {
                case .idle:
                    stats.add(.idleTimeouts, listener: listener)
                    close(slot, reason: .idleTimeout)
                case .stalledSend:
                    stats.add(.sendTimeouts, listener: listener)
                    // Give up on the peer: reset rather than leave the kernel holding
                    // unsent bytes for a reader that may never come back.
                    resetOnClose(record)
                    close(slot, reason: .sendTimeout)
                case .openingTimeout:
                    switch record.pointee.state {
                    case .inspecting: stats.add(.sniTimeouts, listener: listener)
                    case .upstreamHandshaking:
                        upstreamHandshakeFailed(record)
                        stats.add(.connectTimeouts, endpoint: Int(record.pointee.endpoint))
                    default: stats.add(.tlsHandshakeTimeouts, listener: listener)
                    }
                    close(slot, reason: .idleTimeout)
                case .refile(let deadline):
                    wheel.insert(slot, deadline: deadline, in: slab)
                }
            }
        }
    }

    enum TimerVerdict {
        case idle, stalledSend, openingTimeout
        case refile(UInt32)
    }

    /// What a connection's timers say now. With no send in flight the next check is one
    /// send timeout away, so a send that starts later is still caught in time.
    @inline(__always)
    func timerCheck(_ record: UnsafeMutablePointer<Connection>, plan: WorkerPlan, listener: Int) -> TimerVerdict {
        if record.pointee.state == .handshaking || record.pointee.state == .inspecting || record.pointee.state == .upstreamHandshaking {
            let limit = record.pointee.state == .upstreamHandshaking ? plan.connectTicks[listener] : plan.openingTicks[listener]
            let elapsed = clock.tick &- record.pointee.lastActivity
            return elapsed >= limit ? .openingTimeout : .refile(record.pointee.lastActivity &+ limit)
        }
        let idle = plan.idleTicks[listener]
        let send = plan.sendTicks[listener]
        var next = UInt32.max
        if idle > 0 {
            var deadline = record.pointee.lastActivity &+ idle
            if deadline <= clock.tick {
                // The peer still taking what l4lb handed the kernel long ago is progress
                // too: a slow reader draining a large socket buffer is not idle.
                let sent = min(ticksSincePeerTookData(record.pointee.client), ticksSincePeerTookData(record.pointee.upstream))
                guard sent < idle else { return .idle }
                deadline = clock.tick &+ (idle - sent)
            }
            next = deadline
        }
        if send > 0 {
            let up = sendDeadline(record, toUpstream: true, send: send)
            let down = sendDeadline(record, toUpstream: false, send: send)
            guard let up, let down else { return .stalledSend }
            next = min(next, up, down)
        }
        return .refile(next)
    }

    /// When a direction's send next needs a look, or nil when it has stalled for
    /// `send_timeout`: by then the peer must also have taken no data from the kernel for as
    /// long (a peer draining a large socket buffer is reading, though l4lb's send waits
    /// for room all along; window probes to a peer that reads nothing are not data, and
    /// retransmissions to a peer that acknowledges nothing are not progress).
    @inline(__always)
    func sendDeadline(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool, send: UInt32) -> UInt32? {
        let s = stream(record, toUpstream: toUpstream)
        guard s.pointee.isSending else { return clock.tick &+ send }
        let due = s.pointee.sendProgress &+ send
        if due > clock.tick { return due }
        let sent = ticksSincePeerTookData(destination(record, toUpstream: toUpstream))
        guard sent < send else { return nil }
        s.pointee.sendProgress = clock.tick &- sent
        return clock.tick &+ (send - sent)
    }

    /// Timer ticks since the socket's peer last took data (TCP_INFO; see
    /// `CLinux_tcp_ms_since_progress`).
    @inline(__always)
    func ticksSincePeerTookData(_ fd: Int32) -> UInt32 {
        guard fd >= 0 else { return .max }
        let milliseconds = CLinux_tcp_ms_since_progress(fd)
        return milliseconds == .max ? .max : milliseconds / UInt32(Worker.tickMilliseconds)
    }

    /// Files a new connection under its first timer deadline, if it has any timer.
    @inline(__always)
    func startTimers(_ slot: UInt32, listener: Int) {
        let idle = plans.current.idleTicks[listener]
        let send = plans.current.sendTicks[listener]
        let handshake = plans.current.openingTicks[listener]
        guard idle > 0 || send > 0 || handshake > 0 else { return }
        let first = min(idle == 0 ? UInt32.max : idle, send == 0 ? UInt32.max : send, handshake == 0 ? UInt32.max : handshake)
        wheel.insert(slot, deadline: clock.tick &+ first, in: slab)
    }

    /// `on_unhealthy: close`: after an endpoint stops being available, close what is open
    /// to it (checked once per tick, only when something changed).
    func closeConnectionsToUnavailableEndpoints() {
        let epoch = shared.status.unavailableEpoch.load(ordering: .acquiring)
        guard epoch != plans.seenUnavailableEpoch else { return }
        plans.seenUnavailableEpoch = epoch
        for index in 0..<slab.highWater {
            let record = slab[UInt32(index)]
            let endpoint = Int(record.pointee.endpoint)
            guard endpoint >= 0, record.pointee.state != .free, record.pointee.state != .closing,
                  plans[record.pointee.plan].closeOnUnhealthy[Int(record.pointee.cluster)],
                  !shared.status.flags(endpoint).isDisjoint(with: [.unhealthy, .ejected, .markedUnhealthy])
            else { continue }
            stats.add(.closedUnhealthy, listener: Int(record.pointee.listener))
            close(UInt32(index), reason: .unhealthy)
        }
    }

    func closeAll() {
        logger.info("drain timeout reached, closing \(slab.active) connections", metadata: ["worker": "\(control.index)"])
        for index in 0..<slab.highWater {
            let state = slab[UInt32(index)].pointee.state
            if state != .free, state != .closing { close(UInt32(index), reason: .drain) }
        }
    }
}
