import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The TCP proxy: accept → pick an endpoint → connect (retrying elsewhere) → relay both
/// directions with at most one request in flight each → half-close → close once.
extension Worker {
    // MARK: Accept

    /// Not armed when the submission queue stays full: the next tick tries again.
    /// Not armed when the submission queue stays full: the next tick tries again.
    /// `listener` is the listener's identity; the completion carries its socket's serial.
    func armAccept(_ listener: Int) {
        if listenerIsDatagram[listener] {
            armDatagrams(listener)
            return
        }
        acceptArmed[listener] = ring.prepareMultishotAccept(
            listener: listenerFDs[listener], userData: UserData(.accept, slot: UInt32(listener), generation: listenerSerials[listener]).raw)
        if !acceptArmed[listener] { stats.add(.submissionDrops) }
    }

    func accepted(_ completion: Completion, listener: Int, serial: UInt32) {
        // A retired socket's last completions (its listener was removed or rebound).
        let live = serial == listenerSerials[listener] && listenerFDs[listener] >= 0
        if !completion.hasMore, live {
            acceptArmed[listener] = false
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
        let plan = current
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
        if let maximum, !limits.admit(listener, maximum: maximum) {
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            return
        }
        let cluster = plan.clusterSplits[listener].flatMap { plan.listenerClusters[listener][$0.pick()!] } ?? plan.listenerClusters[listener][0]
        let clusterID = plan.clusterIDs[cluster]
        // Routed by server name: the cluster is known once the ClientHello is read.
        let routed = plan.routes[listener] != nil
        let clusterLimit = routed ? nil : plan.clusterLimits[cluster]
        if let clusterLimit, !status.admit(cluster: clusterID, limit: clusterLimit) {
            // Circuit breaking: the cluster is at max_connections.
            if limited { limits.leave(listener) }
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            stats.add(.clusterFull, listener: listener)
            return
        }
        guard let slot = slab.allocate() else {
            if clusterLimit != nil { status.leave(cluster: clusterID) }
            if limited { limits.leave(listener) }
            leaveSource(sourcePlace)
            refuse(fd, listener: listener)
            return
        }
        let record = slab[slot]
        record.pointee.state = .connecting
        record.pointee.plan = plan.index
        plan.connections += 1
        record.pointee.listener = UInt16(listener)
        record.pointee.client = fd
        record.pointee.counted = true
        record.pointee.listenerLimited = limited
        record.pointee.clusterAdmitted = clusterLimit != nil
        if sourcePlace != 0 {
            record.pointee.holds.insert(.sourcePlace)
            sourcePlaces[Int(slot)] = sourcePlace
        }
        record.pointee.lastActivity = nowTick
        record.pointee.cluster = UInt16(cluster)
        if !routed, plan.balancers[cluster].usesFlowHash {
            record.pointee.flowHash = FlowHash.compute(client: fd, key: plan.hashKeys[cluster])
        }
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        if accessSlots != nil { noteAccepted(slot, client: fd) }
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

    // MARK: Connect

    func startConnect(_ slot: UInt32) {
        let record = slab[slot]
        let listener = Int(record.pointee.listener)
        let plan = plans[Int(record.pointee.plan)].unsafelyUnwrapped
        let clusterIndex = Int(record.pointee.cluster)
        let firstEndpoint = plan.firstEndpoints[clusterIndex]
        let clusterID = plan.clusterIDs[clusterIndex]
        guard let local = chooseEndpoint(slot, record, plan: plan, clusterIndex: clusterIndex, clusterID: clusterID, firstEndpoint: firstEndpoint) else {
            stats.add(.connectFailed, listener: listener)
            close(slot, reason: .connectFailed)
            return
        }
        markTried(slot, record, local)
        let position = firstEndpoint + local
        let endpoint = Int(plan.snapshot.endpointIDs[position])
        let address = UnsafeMutableRawPointer(plan.endpointAddresses + position).assumingMemoryBound(to: sockaddr.self)
        let fd = socket(Int32(address.pointee.sa_family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            noteResourceError(errno, while: "opening an upstream socket")
            // The pick took a place on the endpoint (its max_connections); give it back.
            if record.pointee.endpointLimited {
                record.pointee.endpointLimited = false
                status.leave(endpoint)
            }
            stats.add(.connectFailed, listener: listener)
            close(slot, reason: .connectFailed)
            return
        }
        setNoDelay(fd)
        record.pointee.upstream = fd
        record.pointee.endpoint = Int32(endpoint)
        if let slots = accessSlots { slots[Int(slot)].lastEndpoint = Int32(endpoint) }
        stats.add(.active, endpoint: endpoint)
        activeByEndpoint[endpoint] += 1
        activeByCluster[clusterID] += 1
        guard ring.prepareConnect(
            socket: fd, address: address, length: plan.endpointAddressLengths[position],
            userData: UserData(.connect, slot: slot, generation: record.pointee.generation).raw,
            timeout: plan.connectTimeouts + listener, timeoutUserData: UserData(.linkTimeout).raw)
        else {
            stats.add(.submissionDrops)
            stats.add(.connectFailed, listener: listener)
            close(slot, reason: .error)
            return
        }
        record.pointee.inFlight += 1
    }

    /// Records that this connection tried `local`: a bit below 64, else the next entry of
    /// the slot's side table (touched only by clusters that large).
    @inline(__always)
    func markTried(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, _ local: Int) {
        var count = Int(record.pointee.triedAbove64)
        Worker.exclude(local, bits: &record.pointee.tried, others: triedAbove64 + Int(slot) * Worker.triedStride, count: &count)
        record.pointee.triedAbove64 = UInt8(count)
        record.pointee.attempts &+= 1
    }

    /// The balancer's pick among available endpoints, holding a place on it (its
    /// max_connections). During slow start an endpoint is taken with probability
    /// 10% → 100% over the window, so its share ramps up; rejected picks are skipped for
    /// this choice only.
    func chooseEndpoint(
        _ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, plan: WorkerPlan, clusterIndex: Int, clusterID: Int, firstEndpoint: Int
    ) -> Int? {
        let snapshot = plan.snapshot
        let view = status.view(snapshot, firstEndpoint: firstEndpoint)
        let ids = snapshot.endpointIDs + firstEndpoint
        let limits = snapshot.endpointLimits + firstEndpoint
        let window = plan.slowStartMilliseconds[clusterIndex]
        // Tried endpoints, plus those skipped for this choice only (appended after them).
        var bits = record.pointee.tried
        let others = triedAbove64 + Int(slot) * Worker.triedStride
        var otherCount = Int(record.pointee.triedAbove64)
        var fallback: Int?
        for _ in 0..<Worker.picksPerChoice {
            guard let local = plan.balancers[clusterIndex].pick(
                flowHash: record.pointee.flowHash, tried: TriedEndpoints(bits: bits, others: others, otherCount: otherCount),
                active: ActiveCounts(base: activeByEndpoint, ids: ids), clusterActive: activeByCluster[clusterID], endpoints: view)
            else { break }
            if window > 0 {
                let since = status.availableSince(Int(ids[local]))
                let elapsed = nowMilliseconds - since
                if since > 0, elapsed < window {
                    let factor = 0.1 + 0.9 * Double(elapsed) / Double(window)
                    if Double(random.next() >> 11) * 0x1p-53 >= factor {
                        if fallback == nil { fallback = local }
                        Worker.exclude(local, bits: &bits, others: others, count: &otherCount)
                        continue
                    }
                }
            }
            if admit(record, id: Int(ids[local]), limit: limits[local]) { return local }
            Worker.exclude(local, bits: &bits, others: others, count: &otherCount)
        }
        if let fallback, admit(record, id: Int(ids[fallback]), limit: limits[fallback]) { return fallback }
        return nil
    }

    /// Takes a place on endpoint `id` when it has a connection limit (Int.max: none, and
    /// nothing shared is touched); the record remembers to give it back.
    @inline(__always)
    func admit(_ record: UnsafeMutablePointer<Connection>, id: Int, limit: Int) -> Bool {
        guard limit != Int.max else { return true }
        guard status.admit(id, limit: limit) else { return false }
        record.pointee.endpointLimited = true
        return true
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
            // The linked timeout cancelled the connect.
            if completion.result == -ECANCELED { stats.add(.connectTimeouts, endpoint: endpoint) }
            releaseEndpoint(record)
            Glibc.close(record.pointee.upstream)
            record.pointee.upstream = -1
            if Int(record.pointee.attempts) < plans[Int(record.pointee.plan)].unsafelyUnwrapped.connectAttempts[listener] {
                startConnect(slot)
            } else {
                stats.add(.connectFailed, listener: listener)
                close(slot, reason: .connectFailed)
            }
            return
        }
        // With TLS to the endpoint, a connection counts as made once its handshake is
        // (outlier detection weighs failed handshakes against these).
        if !plans[Int(record.pointee.plan)].unsafelyUnwrapped.wantsUpstreamTLS[Int(record.pointee.cluster)] {
            stats.add(.total, endpoint: endpoint)
        }
        record.pointee.lastActivity = nowTick
        let version = plans[Int(record.pointee.plan)].unsafelyUnwrapped.proxyProtocols[listener]
        if version == .none {
            upstreamReady(slot, record)
            return
        }
        record.pointee.state = .sendingProxyHeader
        if record.pointee.tls, version == .v2 {
            // With the TLS TLVs: longer than the per-slot header area, so from a buffer.
            startTLSProxyHeader(slot, record)
            return
        }
        let header = proxyHeaders + Int(slot) * ProxyProtocolHeader.capacity
        record.pointee.toUpstream.length = Int32(ProxyProtocolHeader.write(version: version, client: record.pointee.client, into: header))
        record.pointee.toUpstream.sent = 0
        sendProxyHeader(slot, record)
    }

    func sendProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let tlsHeader = record.pointee.tls ? tlsSlots[Int(slot)].headerBuffer : Connection.Stream.noBuffer
        let header = tlsHeader != Connection.Stream.noBuffer
            ? bufferAddress(tlsHeader, large: false) : proxyHeaders + Int(slot) * ProxyProtocolHeader.capacity
        let sent = Int(record.pointee.toUpstream.sent)
        guard ring.prepareSend(
            socket: record.pointee.upstream, bytes: header + sent, length: Int(record.pointee.toUpstream.length) - sent,
            userData: UserData(.sendProxyHeader, slot: slot, generation: record.pointee.generation).raw)
        else {
            stats.add(.submissionDrops)
            close(slot, reason: .error)
            return
        }
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
            close(slot, reason: Worker.reason(completion.result))
            return
        }
        record.pointee.toUpstream.sent += completion.result
        if record.pointee.toUpstream.sent < record.pointee.toUpstream.length {
            sendProxyHeader(slot, record)
        } else {
            if record.pointee.tls, tlsSlots[Int(slot)].headerBuffer != Connection.Stream.noBuffer {
                recycle(tlsSlots[Int(slot)].headerBuffer, large: false)
                tlsSlots[Int(slot)].headerBuffer = Connection.Stream.noBuffer
            }
            upstreamReady(slot, record)
        }
    }

    // MARK: Relay

    func startProxying(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        record.pointee.state = .proxying
        // A TLS side's receive may still be armed from its handshake.
        let clientArmed = record.pointee.tls && record.pointee.toUpstream.receiveArmed
        let upstreamArmed = record.pointee.upstreamTLS && record.pointee.toClient.receiveArmed
        record.pointee.toUpstream = Connection.Stream()
        record.pointee.toUpstream.receiveArmed = clientArmed
        record.pointee.toClient = Connection.Stream()
        record.pointee.toClient.receiveArmed = upstreamArmed
        // From a TLS side, plaintext may already wait in OpenSSL (it came with the
        // handshake, or while the other side was opening): read it first.
        if record.pointee.upstreamTLS {
            pullPendingPlaintext(slot, record, atUpstream: true)
        } else {
            armReceive(slot, record, toUpstream: false)
        }
        guard record.pointee.state == .proxying else { return }
        if record.pointee.tls {
            pullPendingPlaintext(slot, record, atUpstream: false)
        } else {
            armReceive(slot, record, toUpstream: true)
        }
    }

    /// Arms the receive of a direction that holds nothing (`Connection.Stream` has the
    /// contract): small buffers through a multishot receive limited to one buffer's worth,
    /// large ones through a single-shot receive.
    @inline(__always)
    func armReceive(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        let socket = source(record, toUpstream: toUpstream)
        let ciphertext = toUpstream ? record.pointee.tls : record.pointee.upstreamTLS
        let large = s.pointee.prefersLarge
        let operation: UserData.Operation = ciphertext
            ? (toUpstream
                ? (large ? .receiveLargeCiphertextFromClient : .receiveCiphertextFromClient)
                : (large ? .receiveLargeCiphertextFromUpstream : .receiveCiphertextFromUpstream))
            : large
            ? (toUpstream ? .receiveLargeFromClient : .receiveLargeFromUpstream)
            : (toUpstream ? .receiveFromClient : .receiveFromUpstream)
        let userData = UserData(operation, slot: slot, generation: record.pointee.generation).raw
        let queued: Bool
        if large {
            queued = ring.prepareReceive(socket: socket, bufferGroup: Worker.largeBufferGroup, userData: userData)
        } else if multishotSmallReceives {
            queued = ring.prepareMultishotReceive(
                socket: socket, bufferGroup: Worker.smallBufferGroup, limit: UInt32(smallBuffers.bufferSize), userData: userData)
        } else {
            queued = ring.prepareReceive(socket: socket, bufferGroup: Worker.smallBufferGroup, userData: userData)
        }
        guard queued else {
            // The submission queue stayed full: try again when buffers are next published.
            stats.add(.submissionDrops)
            waitForBuffer(slot, record, toUpstream: toUpstream)
            return
        }
        s.pointee.receiveArmed = true
        s.pointee.move(to: .receiving)
        record.pointee.inFlight += 1
    }

    /// Queues a direction that holds nothing until buffers return; behind the others when
    /// its connection's other direction is stuck on a peer that is not reading.
    func waitForBuffer(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        if s.pointee.state != .waitingForBuffer { s.pointee.move(to: .waitingForBuffer) }
        let stuck = stream(record, toUpstream: !toUpstream).pointee.isSending
        waiters.push(BufferWaitQueue.entry(slot: slot, toUpstream: toUpstream), priority: stuck ? .later : .first)
    }

    /// Sends what is left of the direction's buffer. The buffer is recycled when this send
    /// completes, never before: the kernel reads it until then.
    @inline(__always)
    func sendPending(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        let sent = Int(s.pointee.sent)
        guard ring.prepareSend(
            socket: destination(record, toUpstream: toUpstream),
            bytes: heldBytes(record, s, toUpstream: toUpstream) + sent, length: Int(s.pointee.length) - sent,
            userData: UserData(toUpstream ? .sendToUpstream : .sendToClient, slot: slot, generation: record.pointee.generation).raw)
        else {
            stats.add(.submissionDrops)
            recycle(s.pointee.buffer, large: s.pointee.large)
            close(slot, reason: .error)
            return
        }
        record.pointee.inFlight += 1
    }

    @inline(__always)
    func startSend(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool, buffer: UInt16, length: Int32, large: Bool) {
        stream(record, toUpstream: toUpstream).pointee.hold(buffer, length: length, large: large, at: nowTick)
        sendPending(slot, record, toUpstream: toUpstream)
    }

    /// What every receive completion does first: takes its buffer, drops a completion of a
    /// slot's earlier connection, ends an arm, and gives the buffer back (finishing the
    /// close) when the connection is not in a state that takes bytes — `.proxying`, or
    /// with `duringOpening` also the TLS handshake and connect. Nil: nothing more to do.
    @inline(__always)
    func beginReceive(
        _ completion: Completion, _ userData: UserData, toUpstream: Bool, large: Bool, duringOpening: Bool
    ) -> (record: UnsafeMutablePointer<Connection>, stream: UnsafeMutablePointer<Connection.Stream>)? {
        let buffer = completion.bufferID
        if buffer != nil { handedOut(large: large) }
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else {
            if let buffer { recycle(buffer, large: large) }
            return nil
        }
        let more = completion.hasMore
        if !more { record.pointee.inFlight -= 1 }
        let state = record.pointee.state
        guard duringOpening ? state != .closing && state != .free : state == .proxying else {
            if let buffer { recycle(buffer, large: large) }
            if !more { finishClosing(slot) }
            return nil
        }
        let s = stream(record, toUpstream: toUpstream)
        if !more { s.pointee.receiveArmed = false }
        return (record, s)
    }

    func received(_ completion: Completion, _ userData: UserData, toUpstream: Bool, large: Bool) {
        guard let (record, s) = beginReceive(completion, userData, toUpstream: toUpstream, large: large, duringOpening: false) else { return }
        let slot = userData.slot
        let buffer = completion.bufferID
        let more = completion.hasMore
        let result = completion.result
        if result > 0, let buffer {
            if !large, Int(result) == smallBuffers.bufferSize {
                s.pointee.prefersLarge = true
            } else if large, Int(result) < smallBuffers.bufferSize {
                s.pointee.prefersLarge = false
            }
            record.pointee.lastActivity = nowTick
            countRelayed(slot, record, toUpstream: toUpstream, result)
            if isTLS(record, atUpstream: toUpstream) {
                receivedPlaintext(slot, record, forTLSAtUpstream: toUpstream, buffer: buffer, length: result, large: large)
            } else if s.pointee.state == .sending {
                absorb(slot, buffer, length: result, into: s)
            } else {
                s.pointee.move(to: .sending)
                startSend(slot, record, toUpstream: toUpstream, buffer: buffer, length: result, large: large)
            }
            return
        }
        if let buffer { recycle(buffer, large: large) }
        if result == 0 {
            if let slots = accessSlots, slots[Int(slot)].firstFIN == 0 {
                slots[Int(slot)].firstFIN = (toUpstream ? EndReason.clientFIN : .upstreamFIN).rawValue
            }
            // EOF: forward it as a half-close once what came before it is sent, and keep
            // the other direction open.
            if isTLS(record, atUpstream: toUpstream) {
                endDirection(slot, record, toUpstream: toUpstream)
            } else if s.pointee.state == .sending {
                s.pointee.move(to: .flushingBeforeEOF)
            } else {
                forwardEOF(slot, record, toUpstream: toUpstream)
            }
        } else if result == -ENOBUFS, large {
            // Large buffers are few: fall back to small ones rather than wait.
            s.pointee.prefersLarge = false
            if s.pointee.state == .receiving { armReceive(slot, record, toUpstream: toUpstream) }
        } else if result == -ENOBUFS {
            // Nothing held: wait for buffers. Sending: re-armed when the send completes.
            stats.add(.bufferWaits, listener: Int(record.pointee.listener))
            if s.pointee.state == .receiving { waitForBuffer(slot, record, toUpstream: toUpstream) }
        } else if result == -ECANCELED, !more {
            if s.pointee.state == .receiving { armReceive(slot, record, toUpstream: toUpstream) }
        } else if !more || result < 0 {
            close(slot, reason: result < 0 ? Worker.reason(result) : nil)
        }
    }

    /// Counts application bytes on their way `toUpstream` (or to the client): the
    /// listener's and the endpoint's, and the access log's.
    @inline(__always)
    func countRelayed(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool, _ count: Int32) {
        let listener = Int(record.pointee.listener)
        let endpoint = Int(record.pointee.endpoint)
        if toUpstream {
            stats.add(.bytesIn, listener: listener, UInt64(count))
            stats.add(.bytesOut, endpoint: endpoint, UInt64(count))
            if let slots = accessSlots { slots[Int(slot)].bytesFromClient &+= UInt64(count) }
        } else {
            stats.add(.bytesOut, listener: listener, UInt64(count))
            stats.add(.bytesIn, endpoint: endpoint, UInt64(count))
            if let slots = accessSlots { slots[Int(slot)].bytesFromUpstream &+= UInt64(count) }
        }
    }

    /// Bytes that arrived while a send is in flight: copied onto the end of the buffer
    /// being sent, or of the one waiting behind it, or kept as that one. By the receive's
    /// limit one arm never needs more (`Connection.Stream`).
    @inline(__always)
    func absorb(_ slot: UInt32, _ buffer: UInt16, length: Int32, into s: UnsafeMutablePointer<Connection.Stream>) {
        let capacity = Int32(smallBuffers.bufferSize)
        if s.pointee.pending == Connection.Stream.noBuffer {
            if !s.pointee.large, s.pointee.length + length <= capacity {
                // Past the bytes the send in flight reads: safe to write now.
                append(buffer, length: length, onto: s.pointee.buffer, holding: &s.pointee.length)
            } else {
                s.pointee.pending = buffer
                s.pointee.pendingLength = length
            }
        } else if s.pointee.pendingLength + length <= capacity {
            append(buffer, length: length, onto: s.pointee.pending, holding: &s.pointee.pendingLength)
        } else {
            // Outside the contract (a kernel that ignored the limit): keep no third buffer.
            assertionFailure("a direction received beyond its two buffers")
            recycle(buffer, large: false)
            close(slot, reason: .error)
        }
    }

    /// Copies small buffer `buffer` onto the end of small buffer `target` (which holds
    /// `held` bytes) and recycles it.
    @inline(__always)
    func append(_ buffer: UInt16, length: Int32, onto target: UInt16, holding held: inout Int32) {
        (bufferAddress(target, large: false) + Int(held)).copyMemory(from: bufferAddress(buffer, large: false), byteCount: Int(length))
        held += length
        recycle(buffer, large: false)
    }

    func sent(_ completion: Completion, _ userData: UserData, toUpstream: Bool) {
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else { return }
        record.pointee.inFlight -= 1
        let s = stream(record, toUpstream: toUpstream)
        guard record.pointee.state == .proxying, completion.result > 0 else {
            recycle(s.pointee.buffer, large: s.pointee.large)
            if record.pointee.state == .proxying { close(slot, reason: Worker.reason(completion.result)) } else { finishClosing(slot) }
            return
        }
        s.pointee.sent += completion.result
        record.pointee.lastActivity = nowTick
        s.pointee.sendProgress = nowTick
        if s.pointee.sent < s.pointee.length {
            sendPending(slot, record, toUpstream: toUpstream)
            return
        }
        if isTLS(record, atUpstream: !toUpstream) {
            plaintextSent(slot, record, toUpstream: toUpstream)
            return
        }
        recycle(s.pointee.buffer, large: s.pointee.large)
        if s.pointee.pending != Connection.Stream.noBuffer {
            let next = s.pointee.pending
            s.pointee.pending = Connection.Stream.noBuffer
            startSend(slot, record, toUpstream: toUpstream, buffer: next, length: s.pointee.pendingLength, large: false)
            return
        }
        if s.pointee.state == .flushingBeforeEOF {
            forwardEOF(slot, record, toUpstream: toUpstream)
        } else if !s.pointee.receiveArmed {
            armReceive(slot, record, toUpstream: toUpstream)
        } else {
            // The multishot receive is still armed: it goes on filling.
            s.pointee.move(to: .receiving)
        }
    }

    /// Everything before the EOF has been sent: half-close the peer, and close the
    /// connection once both directions are done.
    func forwardEOF(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        s.pointee.move(to: .finished)
        // The last direction to end needs no shutdown: both sockets have been read to
        // their FIN, so closing them sends FIN (not RST) — one syscall less per connection.
        if stream(record, toUpstream: !toUpstream).pointee.state == .finished {
            close(slot)
            return
        }
        // A direct syscall, not IORING_OP_SHUTDOWN: the ring always runs shutdown on an
        // io-wq thread, which could resolve the descriptor number after it was closed and
        // reused by a new connection.
        shutdown(destination(record, toUpstream: toUpstream), Int32(SHUT_WR))
    }

    /// A closing connection gives back the buffer waiting behind a send; the one being
    /// sent goes back when that send completes (cancelled).
    func dropPending(_ s: UnsafeMutablePointer<Connection.Stream>) {
        if s.pointee.pending != Connection.Stream.noBuffer {
            recycle(s.pointee.pending, large: false)
            s.pointee.pending = Connection.Stream.noBuffer
        }
    }

    // MARK: Close

    /// Starts closing: counts are released now; sockets close once every request in
    /// flight has completed (they are cancelled), so each closes exactly once.
    /// `reason` is for the access log; nil: as the FINs say (the side that sent the first).
    func close(_ slot: UInt32, reason: EndReason? = nil) {
        let record = slab[slot]
        let state = record.pointee.state
        guard state != .closing, state != .free else { return }
        if accessSlots != nil { logClosed(slot, record, reason: reason) }
        record.pointee.state = .closing
        wheel.remove(slot, in: slab)
        releaseEndpoint(record)
        if record.pointee.clusterAdmitted {
            record.pointee.clusterAdmitted = false
            status.leave(cluster: plans[Int(record.pointee.plan)].unsafelyUnwrapped.clusterIDs[Int(record.pointee.cluster)])
        }
        if record.pointee.counted {
            record.pointee.counted = false
            let listener = Int(record.pointee.listener)
            if record.pointee.listenerLimited { limits.leave(listener) }
            stats.add(.active, listener: listener, UInt64.max)
        }
        if record.pointee.holds.contains(.sourcePlace) {
            record.pointee.holds.remove(.sourcePlace)
            leaveSource(sourcePlaces[Int(slot)])
        }
        dropPending(stream(record, toUpstream: true))
        dropPending(stream(record, toUpstream: false))
        if record.pointee.tls || record.pointee.upstreamTLS { releaseTLSBuffers(slot, record) }
        waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: true))
        waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: false))
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
            status.leave(endpoint)
        }
        activeByEndpoint[endpoint] -= 1
        activeByCluster[plans[Int(record.pointee.plan)].unsafelyUnwrapped.clusterIDs[Int(record.pointee.cluster)]] -= 1
        record.pointee.endpoint = -1
    }

    /// Out of descriptors or memory: tell the operator, at most once a minute per worker
    /// (the counters have every occurrence).
    @inline(never)
    func noteResourceError(_ code: Int32, while doing: String) {
        guard code == EMFILE || code == ENFILE || code == ENOMEM || code == ENOBUFS else { return }
        guard nowMilliseconds - lastResourceWarning >= 60_000 || lastResourceWarning == 0 else { return }
        lastResourceWarning = nowMilliseconds
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
