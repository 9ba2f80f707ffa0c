import URing

#if canImport(Glibc)
import Glibc
#endif

/// The TCP proxy: accept → pick an endpoint → connect (retrying elsewhere) → relay both
/// directions with at most one request in flight each → half-close → close once.
extension Worker {
    // MARK: Accept

    func armAccept(_ listener: Int) {
        ring.prepareMultishotAccept(listener: listenerFDs[listener], userData: UserData(.accept, slot: UInt32(listener)).raw)
        acceptArmed[listener] = true
    }

    func accepted(_ completion: Completion, listener: Int) {
        if !completion.hasMore {
            acceptArmed[listener] = false
            // Re-arm at once after a normal end; after an error, at the next tick.
            if completion.result >= 0, !draining { armAccept(listener) }
        }
        guard completion.result >= 0 else {
            if completion.result != -ECANCELED, completion.result != -EINVAL {
                stats.add(.acceptErrors, listener: listener)
            }
            return
        }
        let fd = completion.result
        guard !draining, limits.admit(listener) else {
            Glibc.close(fd)
            stats.add(.refused, listener: listener)
            return
        }
        let plan = snapshot.listeners[listener]
        let cluster = clusterSplits[listener].flatMap { plan.clusters[$0.pick()!] } ?? plan.clusters[0]
        guard status.admit(cluster: cluster) else {
            // Circuit breaking: the cluster is at max_connections.
            limits.leave(listener)
            Glibc.close(fd)
            stats.add(.refused, listener: listener)
            stats.add(.clusterFull, listener: listener)
            return
        }
        guard let slot = slab.allocate() else {
            status.leave(cluster: cluster)
            limits.leave(listener)
            Glibc.close(fd)
            stats.add(.refused, listener: listener)
            return
        }
        let record = slab[slot]
        record.pointee.state = .connecting
        record.pointee.listener = UInt16(listener)
        record.pointee.client = fd
        record.pointee.counted = true
        record.pointee.clusterAdmitted = true
        record.pointee.lastActivity = nowTick
        record.pointee.cluster = UInt16(cluster)
        if balancers[cluster].usesFlowHash {
            record.pointee.flowHash = FlowHash.compute(client: fd, key: snapshot.clusters[cluster].hashKey)
        }
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        if idleTicks[listener] > 0 {
            wheel.insert(slot, deadline: nowTick &+ idleTicks[listener], in: slab)
        }
        startConnect(slot)
    }

    // MARK: Connect

    func startConnect(_ slot: UInt32) {
        let record = slab[slot]
        let listener = Int(record.pointee.listener)
        let clusterIndex = Int(record.pointee.cluster)
        let cluster = snapshot.clusters[clusterIndex]
        guard let local = chooseEndpoint(record, clusterIndex: clusterIndex, cluster: cluster) else {
            stats.add(.connectFailed, listener: listener)
            close(slot)
            return
        }
        record.pointee.tried |= 1 &<< UInt64(local & 63)
        record.pointee.attempts &+= 1
        let endpoint = cluster.firstEndpoint + local
        let address = UnsafeMutableRawPointer(endpointAddresses + endpoint).assumingMemoryBound(to: sockaddr.self)
        let fd = socket(Int32(address.pointee.sa_family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            stats.add(.connectFailed, listener: listener)
            close(slot)
            return
        }
        setNoDelay(fd)
        record.pointee.upstream = fd
        record.pointee.endpoint = Int32(endpoint)
        stats.add(.active, endpoint: endpoint)
        activeByEndpoint[endpoint] += 1
        activeByCluster[clusterIndex] += 1
        ring.prepareConnect(
            socket: fd, address: address, length: endpointAddressLengths[endpoint],
            userData: UserData(.connect, slot: slot, generation: record.pointee.generation).raw,
            timeout: connectTimeouts + listener, timeoutUserData: UserData(.linkTimeout).raw)
        record.pointee.inFlight += 1
    }

    /// The balancer's pick among available endpoints, holding a place on it (its
    /// max_connections). During slow start an endpoint is taken with probability
    /// 10% → 100% over the window, so its share ramps up; rejected picks are skipped for
    /// this choice only.
    func chooseEndpoint(_ record: UnsafeMutablePointer<Connection>, clusterIndex: Int, cluster: Snapshot.ClusterPlan) -> Int? {
        let view = status.view(firstEndpoint: cluster.firstEndpoint)
        let window = slowStartMilliseconds[clusterIndex]
        var skip = record.pointee.tried
        var fallback: Int?
        for _ in 0..<8 {
            guard let local = balancers[clusterIndex].pick(
                flowHash: record.pointee.flowHash, tried: skip,
                active: activeByEndpoint + cluster.firstEndpoint, clusterActive: activeByCluster[clusterIndex], endpoints: view)
            else { break }
            let bit: UInt64 = 1 &<< UInt64(local & 63)
            if window > 0 {
                let since = status.availableSince(cluster.firstEndpoint + local)
                let elapsed = nowMilliseconds - since
                if since > 0, elapsed < window {
                    let factor = 0.1 + 0.9 * Double(elapsed) / Double(window)
                    if Double(random.next() >> 11) * 0x1p-53 >= factor {
                        if fallback == nil { fallback = local }
                        skip |= bit
                        continue
                    }
                }
            }
            if status.admit(cluster.firstEndpoint + local) { return local }
            skip |= bit
        }
        if let fallback, status.admit(cluster.firstEndpoint + fallback) { return fallback }
        return nil
    }

    func connected(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else { return }
        record.pointee.inFlight -= 1
        guard record.pointee.state == .connecting else {
            finishClosing(slot)
            return
        }
        let endpoint = Int(record.pointee.endpoint)
        let listener = Int(record.pointee.listener)
        guard completion.result >= 0 else {
            stats.add(.connectFailures, endpoint: endpoint)
            releaseEndpoint(record)
            Glibc.close(record.pointee.upstream)
            record.pointee.upstream = -1
            if Int(record.pointee.attempts) < snapshot.listeners[listener].connectAttempts {
                startConnect(slot)
            } else {
                stats.add(.connectFailed, listener: listener)
                close(slot)
            }
            return
        }
        stats.add(.total, endpoint: endpoint)
        record.pointee.lastActivity = nowTick
        let version = snapshot.listeners[listener].proxyProtocol
        if version == .none {
            startProxying(slot, record)
            return
        }
        let header = proxyHeaders + Int(slot) * ProxyProtocolHeader.capacity
        record.pointee.state = .sendingProxyHeader
        record.pointee.toUpstream.length = Int32(ProxyProtocolHeader.write(version: version, client: record.pointee.client, into: header))
        record.pointee.toUpstream.sent = 0
        sendProxyHeader(slot, record)
    }

    func sendProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let header = proxyHeaders + Int(slot) * ProxyProtocolHeader.capacity
        let sent = Int(record.pointee.toUpstream.sent)
        ring.prepareSend(
            socket: record.pointee.upstream, bytes: header + sent, length: Int(record.pointee.toUpstream.length) - sent,
            userData: UserData(.sendProxyHeader, slot: slot, generation: record.pointee.generation).raw)
        record.pointee.inFlight += 1
    }

    func proxyHeaderSent(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else { return }
        record.pointee.inFlight -= 1
        guard record.pointee.state == .sendingProxyHeader else {
            finishClosing(slot)
            return
        }
        guard completion.result > 0 else {
            close(slot)
            return
        }
        record.pointee.toUpstream.sent += completion.result
        if record.pointee.toUpstream.sent < record.pointee.toUpstream.length {
            sendProxyHeader(slot, record)
        } else {
            startProxying(slot, record)
        }
    }

    // MARK: Relay

    func startProxying(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        record.pointee.state = .proxying
        record.pointee.toUpstream = Connection.Stream()
        record.pointee.toClient = Connection.Stream()
        armReceive(slot, record, toUpstream: true)
        armReceive(slot, record, toUpstream: false)
    }

    /// Small buffers: a multishot receive that stays armed across sends. Large buffers: one
    /// single-shot receive, re-armed after its send (bulk wants big reads, not overlap).
    @inline(__always)
    func armReceive(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        s.pointee.receiving = true
        s.pointee.waitingForBuffer = false
        let large = s.pointee.prefersLarge
        s.pointee.multishot = !large
        let socket = source(record, toUpstream: toUpstream)
        let operation: UserData.Operation = large
            ? (toUpstream ? .receiveLargeFromClient : .receiveLargeFromUpstream)
            : (toUpstream ? .receiveFromClient : .receiveFromUpstream)
        let userData = UserData(operation, slot: slot, generation: record.pointee.generation).raw
        if large {
            ring.prepareReceive(socket: socket, bufferGroup: Worker.largeBufferGroup, userData: userData)
        } else {
            ring.prepareMultishotReceive(socket: socket, bufferGroup: Worker.smallBufferGroup, userData: userData)
        }
        record.pointee.inFlight += 1
    }

    @inline(__always)
    func sendPending(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        let sent = Int(s.pointee.sent)
        ring.prepareSend(
            socket: destination(record, toUpstream: toUpstream),
            bytes: bufferAddress(s.pointee.buffer, large: s.pointee.large) + sent, length: Int(s.pointee.length) - sent,
            userData: UserData(toUpstream ? .sendToUpstream : .sendToClient, slot: slot, generation: record.pointee.generation).raw)
        record.pointee.inFlight += 1
    }

    @inline(__always)
    func startSend(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool, buffer: UInt16, length: Int32, large: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        s.pointee.sending = true
        s.pointee.buffer = buffer
        s.pointee.large = large
        s.pointee.length = length
        s.pointee.sent = 0
        sendPending(slot, record, toUpstream: toUpstream)
    }

    func received(_ completion: Completion, _ userData: UserData, toUpstream: Bool, large: Bool) {
        let buffer = completion.bufferID
        if buffer != nil, !large { smallBuffersOut += 1 }
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else {
            if let buffer { recycle(buffer, large: large) }
            return
        }
        let more = completion.hasMore
        if !more { record.pointee.inFlight -= 1 }
        guard record.pointee.state == .proxying else {
            if let buffer { recycle(buffer, large: large) }
            if !more { finishClosing(slot) }
            return
        }
        let s = stream(record, toUpstream: toUpstream)
        if !more {
            s.pointee.receiving = false
            s.pointee.multishot = false
            s.pointee.stopping = false
        }
        let result = completion.result
        if result > 0, let buffer {
            if !large, Int(result) == smallBuffers.bufferSize {
                s.pointee.prefersLarge = true
            } else if large, Int(result) < smallBuffers.bufferSize {
                s.pointee.prefersLarge = false
            }
            record.pointee.lastActivity = nowTick
            let listener = Int(record.pointee.listener)
            let endpoint = Int(record.pointee.endpoint)
            if toUpstream {
                stats.add(.bytesIn, listener: listener, UInt64(result))
                stats.add(.bytesOut, endpoint: endpoint, UInt64(result))
            } else {
                stats.add(.bytesOut, listener: listener, UInt64(result))
                stats.add(.bytesIn, endpoint: endpoint, UInt64(result))
            }
            if s.pointee.sending {
                enqueue(buffer, length: result, on: s)
            } else {
                startSend(slot, record, toUpstream: toUpstream, buffer: buffer, length: result, large: large)
            }
            // Backpressure: a buffer already waiting means the reader is slower than the
            // writer; stop receiving until the queue drains. Bulk: stop, to re-arm large.
            if s.pointee.receiving, s.pointee.multishot, !s.pointee.stopping, s.pointee.queued > 0 || s.pointee.prefersLarge {
                s.pointee.stopping = true
                ring.prepareCancel(target: userData.raw, userData: UserData(.cancel).raw)
            }
            return
        }
        if let buffer { recycle(buffer, large: large) }
        if result == 0 {
            // EOF: forward it as a half-close (after what is queued) and keep the other
            // direction open.
            s.pointee.eof = true
            if !s.pointee.sending { forwardEOF(slot, record, toUpstream: toUpstream) }
        } else if result == -ENOBUFS, large {
            // Large buffers are few: fall back to small ones rather than wait.
            s.pointee.prefersLarge = false
            if !s.pointee.sending { armReceive(slot, record, toUpstream: toUpstream) }
        } else if result == -ENOBUFS {
            // Re-armed when the send in flight completes, or when buffers return.
            if !s.pointee.sending {
                s.pointee.waitingForBuffer = true
                stats.add(.bufferWaits, listener: Int(record.pointee.listener))
                waiters.push(userData.raw)
            }
        } else if result == -ECANCELED, !more {
            // Stopped for backpressure or to switch buffer size: re-armed once idle.
            if !s.pointee.sending { armReceive(slot, record, toUpstream: toUpstream) }
        } else {
            close(slot)
        }
    }

    func sent(_ completion: Completion, _ userData: UserData, toUpstream: Bool) {
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else { return }
        record.pointee.inFlight -= 1
        let s = stream(record, toUpstream: toUpstream)
        guard record.pointee.state == .proxying, completion.result > 0 else {
            recycle(s.pointee.buffer, large: s.pointee.large)
            s.pointee.sending = false
            if record.pointee.state == .proxying { close(slot) } else { finishClosing(slot) }
            return
        }
        s.pointee.sent += completion.result
        if s.pointee.sent < s.pointee.length {
            sendPending(slot, record, toUpstream: toUpstream)
            return
        }
        recycle(s.pointee.buffer, large: s.pointee.large)
        record.pointee.lastActivity = nowTick
        if s.pointee.queued > 0 {
            let next = dequeue(from: s)
            startSend(slot, record, toUpstream: toUpstream, buffer: next, length: queuedLength[Int(next)], large: false)
            return
        }
        s.pointee.sending = false
        if s.pointee.eof {
            forwardEOF(slot, record, toUpstream: toUpstream)
        } else if !s.pointee.receiving, !s.pointee.waitingForBuffer {
            armReceive(slot, record, toUpstream: toUpstream)
        }
    }

    /// Everything before the EOF has been sent: half-close the peer, and close the
    /// connection once both directions are done.
    func forwardEOF(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        s.pointee.finished = true
        // The last direction to end needs no shutdown: both sockets have been read to
        // their FIN, so closing them sends FIN (not RST) — one syscall less per connection.
        if stream(record, toUpstream: !toUpstream).pointee.finished {
            close(slot)
            return
        }
        // A direct syscall, not IORING_OP_SHUTDOWN: the ring always runs shutdown on an
        // io-wq thread, which could resolve the descriptor number after it was closed and
        // reused by a new connection.
        shutdown(destination(record, toUpstream: toUpstream), Int32(SHUT_WR))
    }

    @inline(__always)
    func enqueue(_ buffer: UInt16, length: Int32, on s: UnsafeMutablePointer<Connection.Stream>) {
        queuedLength[Int(buffer)] = length
        if s.pointee.queued == 0 {
            s.pointee.queueHead = buffer
        } else {
            queuedNext[Int(s.pointee.queueTail)] = buffer
        }
        s.pointee.queueTail = buffer
        s.pointee.queued += 1
    }

    @inline(__always)
    func dequeue(from s: UnsafeMutablePointer<Connection.Stream>) -> UInt16 {
        let buffer = s.pointee.queueHead
        s.pointee.queueHead = queuedNext[Int(buffer)]
        s.pointee.queued -= 1
        return buffer
    }

    /// Buffers received but not sent go back to the ring when the connection closes.
    func dropQueued(_ s: UnsafeMutablePointer<Connection.Stream>) {
        while s.pointee.queued > 0 { recycle(dequeue(from: s), large: false) }
    }

    // MARK: Close

    /// Starts closing: counts are released now; sockets close once every request in
    /// flight has completed (they are cancelled), so each closes exactly once.
    func close(_ slot: UInt32) {
        let record = slab[slot]
        let state = record.pointee.state
        guard state != .closing, state != .free else { return }
        record.pointee.state = .closing
        wheel.remove(slot, in: slab)
        releaseEndpoint(record)
        if record.pointee.clusterAdmitted {
            record.pointee.clusterAdmitted = false
            status.leave(cluster: Int(record.pointee.cluster))
        }
        if record.pointee.counted {
            record.pointee.counted = false
            let listener = Int(record.pointee.listener)
            limits.leave(listener)
            stats.add(.active, listener: listener, UInt64.max)
        }
        dropQueued(stream(record, toUpstream: true))
        dropQueued(stream(record, toUpstream: false))
        if record.pointee.inFlight > 0 {
            ring.prepareCancelAll(fd: record.pointee.client, userData: UserData(.cancel).raw)
            if record.pointee.upstream >= 0 {
                ring.prepareCancelAll(fd: record.pointee.upstream, userData: UserData(.cancel).raw)
            }
        }
        finishClosing(slot)
    }

    func finishClosing(_ slot: UInt32) {
        let record = slab[slot]
        guard record.pointee.state == .closing, record.pointee.inFlight == 0 else { return }
        Glibc.close(record.pointee.client)
        if record.pointee.upstream >= 0 { Glibc.close(record.pointee.upstream) }
        slab.release(slot)
    }

    @inline(__always)
    func releaseEndpoint(_ record: UnsafeMutablePointer<Connection>) {
        let endpoint = Int(record.pointee.endpoint)
        guard endpoint >= 0 else { return }
        stats.add(.active, endpoint: endpoint, UInt64.max)
        status.leave(endpoint)
        activeByEndpoint[endpoint] -= 1
        activeByCluster[Int(record.pointee.cluster)] -= 1
        record.pointee.endpoint = -1
    }

    @inline(__always)
    func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }
}
