import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// Closing a connection: counts released at once, sockets closed once every request in
/// flight has completed, resource errors noted.
extension Worker {
    /// Starts closing: counts are released now; sockets close once every request in
    /// flight has completed (they are cancelled), so each closes exactly once.
    /// `reason` is for the access log; nil: as the FINs say (the side that sent the first).
    func close(_ slot: UInt32, reason: EndReason? = nil) {
        let record = slab[slot]
        let state = record.pointee.state
        guard state != .closing, state != .free else { return }
        if side.access != nil { logClosed(slot, record, reason: reason) }
        record.pointee.move(to: .closing)
        wheel.remove(slot, in: slab)
        releaseEndpoint(record)
        if record.pointee.clusterAdmitted {
            record.pointee.clusterAdmitted = false
            shared.status.leave(cluster: plans[record.pointee.plan].clusterIDs[Int(record.pointee.cluster)])
        }
        if record.pointee.counted {
            record.pointee.counted = false
            let listener = Int(record.pointee.listener)
            if record.pointee.listenerLimited { shared.limits.leave(listener) }
            stats.add(.active, listener: listener, UInt64.max)
        }
        if record.pointee.holds.contains(.sourcePlace) {
            record.pointee.holds.remove(.sourcePlace)
            leaveSource(side.sourcePlaces[Int(slot)])
        }
        dropPending(stream(record, toUpstream: true))
        dropPending(stream(record, toUpstream: false))
        if record.pointee.tls || record.pointee.upstreamTLS { releaseTLSBuffers(slot, record) }
        buffers.waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: true))
        buffers.waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: false))
        if record.pointee.inFlight > 0 {
            cancelAll(on: record.pointee.client)
            if record.pointee.upstream >= 0 { cancelAll(on: record.pointee.upstream) }
        }
        finishClosing(slot)
    }

    /// Cancels every request on `fd`. When even that cannot be queued, shutting the socket
    /// down makes its requests complete on their own.
    @inline(__always)
    func cancelAll(on fd: Int32) {
        if !ring.prepareCancelAll(fd: fd, userData: UserData(.cancel).raw) {
            stats.add(.submissionDrops)
            shutdown(fd, Int32(SHUT_RDWR))
        }
    }

    /// The prologue of a completion that holds no buffer: the record, when the completion
    /// is its plans.current connection's (its generation) and the connection is still `state`;
    /// nil when the completion is stale, or the connection is closing (finished here once
    /// its last request has completed).
    @inline(__always)
    func completedRecord(_ userData: UserData, expecting state: Connection.State) -> UnsafeMutablePointer<Connection>? {
        let record = slab[userData.slot]
        guard record.pointee.generation == userData.generation else { return nil }
        record.pointee.inFlight -= 1
        guard record.pointee.state == state else {
            finishClosing(userData.slot)
            return nil
        }
        return record
    }

    func finishClosing(_ slot: UInt32) {
        let record = slab[slot]
        guard record.pointee.state == .closing, record.pointee.inFlight == 0 else { return }
        Glibc.close(record.pointee.client)
        if record.pointee.upstream >= 0 { Glibc.close(record.pointee.upstream) }
        if record.pointee.tls || record.pointee.upstreamTLS { freeTLS(slot, record) }
        let plan = record.pointee.plan
        slab.release(slot)
        release(plan: plan)
    }

    @inline(__always)
    func releaseEndpoint(_ record: UnsafeMutablePointer<Connection>) {
        let endpoint = Int(record.pointee.endpoint)
        guard endpoint >= 0 else { return }
        stats.add(.active, endpoint: endpoint, UInt64.max)
        if record.pointee.endpointLimited {
            record.pointee.endpointLimited = false
            shared.status.leave(endpoint)
        }
        active.byEndpoint[endpoint] -= 1
        active.byCluster[plans[record.pointee.plan].clusterIDs[Int(record.pointee.cluster)]] -= 1
        record.pointee.endpoint = -1
    }

    /// Out of descriptors or memory: tell the operator, at most once a minute per worker
    /// (the counters have every occurrence).
    @inline(never)
    func noteResourceError(_ code: Int32, while doing: String) {
        guard code == EMFILE || code == ENFILE || code == ENOMEM || code == ENOBUFS else { return }
        guard clock.milliseconds - lastResourceWarning >= 60_000 || lastResourceWarning == 0 else { return }
        lastResourceWarning = clock.milliseconds
        let what = code == EMFILE || code == ENFILE ? "out of file descriptors" : "out of memory"
        logger.warning("\(what) while \(doing): \(String(cString: strerror(code))); new clients are refused until it recovers", metadata: [
            "worker": "\(control.index)",
        ])
    }

    /// Makes the coming close send RST on both sockets and drop what is unsent.
    func resetOnClose(_ record: UnsafeMutablePointer<Connection>) {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        let size = socklen_t(MemoryLayout<Glibc.linger>.size)
        setsockopt(record.pointee.client, SOL_SOCKET, SO_LINGER, &linger, size)
        if record.pointee.upstream >= 0 { setsockopt(record.pointee.upstream, SOL_SOCKET, SO_LINGER, &linger, size) }
    }

    @inline(__always)
    func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }
}
