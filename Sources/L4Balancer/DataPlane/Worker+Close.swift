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
            // Fails only for a socket already shut down or reset, whose requests end anyway.
            try? SocketCalls.shutdown(fd, Int32(SHUT_RDWR))
        }
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
    func noteResourceError(_ error: Errno, while doing: String) {
        let outOfDescriptors = error == .tooManyOpenFiles || error == .fileTableOverflow
        guard outOfDescriptors || error == .outOfMemory || error == .noBufferSpace else { return }
        guard clock.milliseconds - lastResourceWarning >= 60_000 || lastResourceWarning == 0 else { return }
        lastResourceWarning = clock.milliseconds
        let what = outOfDescriptors ? "out of file descriptors" : "out of memory"
        logger.warning("\(what) while \(doing): \(error); new clients are refused until it recovers", metadata: [
            "worker": "\(control.index)",
        ])
    }

    /// Makes the coming close send RST on both sockets and drop what is unsent.
    func resetOnClose(_ record: UnsafeMutablePointer<Connection>) {
        // SO_LINGER cannot fail on an open TCP socket; if it did, the close sends FIN instead.
        let linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        try? SocketCalls.setOption(record.pointee.client, level: SOL_SOCKET, SO_LINGER, linger)
        if record.pointee.upstream >= 0 { try? SocketCalls.setOption(record.pointee.upstream, level: SOL_SOCKET, SO_LINGER, linger) }
    }

    @inline(__always)
    func setNoDelay(_ fd: Int32) {
        // Cannot fail on a TCP socket; if it did, the relay still works, with Nagle's delays.
        try? SocketCalls.setOption(fd, level: Int32(IPPROTO_TCP), TCP_NODELAY, Int32(1))
    }
}
