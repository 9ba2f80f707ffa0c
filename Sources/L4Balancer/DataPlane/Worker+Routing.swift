import URing

#if canImport(Glibc)
import Glibc
#endif

/// SNI routing without termination (`routes`): the ClientHello is read with `MSG_PEEK`,
/// so its bytes stay in the socket and reach the chosen upstream as the relay's first
/// bytes. While it is incomplete, `SO_RCVLOWAT` is raised to the length it declares and a
/// poll waits for that much: a ClientHello in 1-byte segments costs one wake-up per
/// threshold, not one per byte, and holds no buffer between peeks.
///
/// During inspection the record keeps the bytes seen by the last peek
/// (`inspectedBytes`), the raised threshold (`inspectionLowWater`) and whether the client
/// has half-closed (`Flags.clientHalfClosed`).
extension Worker {
    /// POLLRDHUP (the peer half-closed): glibc declares it only under _GNU_SOURCE.
    static var pollReadHangUp: Int32 { 0x2000 }

    func startInspecting(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        record.pointee.move(to: .inspecting)
        peekClientHello(slot, record)
    }

    func peekClientHello(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        queued(ring.prepareReceive(
            socket: record.pointee.client, bufferGroup: Worker.smallBufferGroup, flags: Int32(MSG_PEEK),
            userData: UserData(.peekClientHello, slot: slot, generation: record.pointee.generation).raw), slot, record)
    }

    func peekedClientHello(_ completion: Completion, _ userData: UserData) {
        guard let record = receivedRecord(completion, userData, large: false, in: .inspection) else { return }
        let slot = userData.slot
        let buffer = completion.bufferID
        let listener = Int(record.pointee.listener)
        let result = completion.result
        guard result > 0, let buffer else {
            if let buffer { recycle(buffer, large: false) }
            if completion.error == .noBufferSpace {
                // No buffer to peek into: again at the next tick.
                stats.add(.bufferWaits, listener: listener)
                buffers.retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            } else {
                close(slot, reason: result == 0 ? .clientFIN : Worker.reason(result))
            }
            return
        }
        let bytes = UnsafeRawBufferPointer(start: bufferAddress(buffer, large: false), count: Int(result))
        switch ClientHello.parse(bytes) {
        case .complete(let offset, let length):
            let routes = plans[record.pointee.plan].routes[listener].unsafelyUnwrapped
            let matched = length > 0 ? routes.route(for: bytes, offset: offset, length: length) : nil
            recycle(buffer, large: false)
            stats.add(matched == nil ? .sniDefault : .sniRouted, listener: listener)
            if let matched { stats.addRouteHit(listener: listener, route: matched) }
            let routed = matched.map { routes.clusters[$0] }
            if record.pointee.inspectionLowWater != 0 { setReceiveLowWater(record.pointee.client, 1) }
            record.pointee.toUpstream = Connection.Stream()
            route(slot, record, cluster: routed ?? routes.defaultCluster)
        case .needMore(let total):
            recycle(buffer, large: false)
            if total > buffers.small.bufferSize {
                stats.add(.sniOversize, listener: listener)
                close(slot, reason: .error)
            } else if record.pointee.flags.contains(.clientHalfClosed), result <= record.pointee.inspectedBytes {
                // The client half-closed with its ClientHello unfinished.
                stats.add(.sniMalformed, listener: listener)
                close(slot, reason: .clientFIN)
            } else {
                record.pointee.inspectedBytes = result
                if record.pointee.inspectionLowWater != Int32(total) {
                    record.pointee.inspectionLowWater = Int32(total)
                    setReceiveLowWater(record.pointee.client, Int32(total))
                }
                armClientHelloPoll(slot, record)
            }
        case .invalid:
            recycle(buffer, large: false)
            stats.add(.sniMalformed, listener: listener)
            close(slot, reason: .error)
        case .oversize:
            recycle(buffer, large: false)
            stats.add(.sniOversize, listener: listener)
            close(slot, reason: .error)
        }
    }

    func armClientHelloPoll(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        queued(ring.preparePoll(
            fd: record.pointee.client, events: UInt32(Int32(POLLIN) | Worker.pollReadHangUp),
            userData: UserData(.clientHelloReadable, slot: slot, generation: record.pointee.generation).raw), slot, record)
    }

    func clientHelloReadable(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        guard let record = succeededRecord(completion, userData, expecting: .inspecting) else { return }
        // Peek again either way: a client may send its last bytes and FIN together.
        if Int32(completion.result) & (Worker.pollReadHangUp | Int32(POLLHUP) | Int32(POLLERR)) != 0 { record.pointee.flags.insert(.clientHalfClosed) }
        peekClientHello(slot, record)
    }

    /// The route is known: circuit breaking and the flow hash for that cluster, then the
    /// upstream connect, as at accept for a plain listener.
    func route(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, cluster: Int) {
        let plan = plans[record.pointee.plan]
        if let limit = plan.clusterLimits[cluster] {
            guard shared.status.admit(cluster: plan.clusterIDs[cluster], limit: limit) else {
                stats.add(.clusterFull, listener: Int(record.pointee.listener))
                close(slot, reason: .refused)
                return
            }
            record.pointee.clusterAdmitted = true
        }
        record.pointee.cluster = UInt16(cluster)
        if plan.balancers[cluster].usesFlowHash {
            record.pointee.flowHash = FlowHash.compute(client: record.pointee.client, key: plan.hashKeys[cluster])
        }
        record.pointee.move(to: .connecting)
        startConnect(slot)
    }

    @inline(__always)
    func setReceiveLowWater(_ fd: Int32, _ bytes: Int32) {
        // If refused, the peek wakes for every segment of the ClientHello: slower, not wrong.
        try? SocketCalls.setOption(fd, level: SOL_SOCKET, SO_RCVLOWAT, bytes)
    }
}
