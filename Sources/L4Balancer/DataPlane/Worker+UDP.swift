import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The UDP proxy (DESIGN §3): multishot recvmsg on the worker's listener socket into
/// datagram buffers; a session per client address with a connected upstream socket to
/// the endpoint the balancer picked; each datagram sent on as it came (one datagram, one
/// send: boundaries kept), replies sent back from the listener socket to the client's
/// address, straight out of the buffer they arrived in. A buffer is held only while its
/// datagram is in flight. Sessions expire after `idle_timeout`; beyond `max_sessions`
/// the longest idle is evicted. Datagrams the worker cannot relay are dropped and
/// counted: UDP never blocks the worker and never holds more than the buffer pool.
extension Worker {
    static let datagramBufferGroup: UInt16 = 3
    /// Room for the largest UDP payload (65,507) after recvmsg's header and the sender's
    /// address.
    static let datagramBufferSize = 65_536 + 128
    static let datagramBufferCount = 256
    static let datagramControlLength = 64

    // MARK: From clients

    func armDatagrams(_ listener: Int) {
        listeners[listener].armed = ring.prepareMultishotReceiveMessage(
            socket: listeners[listener].fd, message: datagrams.header, bufferGroup: Worker.datagramBufferGroup,
            userData: UserData.listener(.datagramFromClient, listener, serial: listeners[listener].serial).raw)
        if !listeners[listener].armed { stats.add(.submissionDrops) }
    }

    func datagramFromClient(_ completion: Completion, listener: Int, serial: UInt32) {
        let live = listeners.isLive(listener, serial: serial)
        if !completion.hasMore, live {
            listeners[listener].armed = false
            // Out of buffers: re-armed once one is recycled (the datagrams wait in the
            // socket's queue meanwhile; the kernel drops and counts beyond it).
            if completion.error == .noBufferSpace {
                datagrams.receivesWaiting = true
            } else if completion.result >= 0, !draining {
                armDatagrams(listener)
            }
        }
        guard let buffer = completion.bufferID else {
            // No buffer free: the datagram waits in the socket until a buffer is recycled.
            if completion.error == .noBufferSpace { stats.add(.bufferWaits, listener: listener) }
            return
        }
        datagrams.buffers.handedOut()
        guard completion.result >= 0, live, !draining else {
            datagrams.buffers.recycle(buffer)
            return
        }
        guard let message = ReceivedMessage(buffer: datagrams.buffers.address(of: buffer), length: completion.result, message: datagrams.header),
              !message.truncated, let key = UDPClientKey(message.name, length: message.nameLength)
        else {
            datagrams.buffers.recycle(buffer)
            stats.add(.dropsMalformed, listener: listener)
            return
        }
        if sourceFilter.enforcing {
            // The user-space blocklist, per datagram (as XDP would have dropped it).
            let verdict = sourceFilter.verdict(address: message.name, port: plans.current.listenerPorts[listener], transport: .udp)
            stats.add(.filterCounter(verdict))
            if verdict.drops {
                datagrams.buffers.recycle(buffer)
                return
            }
        }
        let plan = plans.current
        let rule = plan.rateRules[listener]
        if let rule, rule.packetInterval > 0, !admitDatagram(message.name, rule, listener: listener) {
            datagrams.buffers.recycle(buffer)
            return
        }
        guard let session = session(for: message, key, listener: listener, plan: plan, rule: rule) else {
            datagrams.buffers.recycle(buffer)
            return
        }
        let length = message.payloadLength
        guard ring.prepareSend(socket: datagrams.sessions[session].upstream, bytes: message.payload, length: length,
                               userData: UserData.datagram(.datagramToUpstream, buffer: buffer, listener: listener).raw)
        else {
            datagrams.buffers.recycle(buffer)
            stats.add(.dropsQueueFull, listener: listener)
            if plan.perPacket[listener] { endLease(session) }
            return
        }
        stats.add(.datagramsIn, listener: listener)
        stats.add(.bytesIn, listener: listener, UInt64(length))
        stats.add(.bytesOut, endpoint: Int(datagrams.sessions[session].endpoint), UInt64(length))
        datagrams.sessions[session].bytesFromClient &+= UInt64(length)
        datagrams.sessions[session].requests &+= 1
        // No reply expected (`proxy_responses: 0`): the socket can serve the next datagram.
        if plan.proxyResponses[listener] == 0 { endLease(session) }
    }

    /// The session a client's datagram goes out on: a lent upstream socket (`per_packet`),
    /// the client's session, or a new one (within its source's rate limit). Nil when there
    /// is none to be had; the drop is counted.
    @inline(__always)
    func session(for message: ReceivedMessage, _ key: UDPClientKey, listener: Int, plan: WorkerPlan, rule: SourceRateRule?) -> UInt32? {
        if plan.perPacket[listener] {
            guard let lent = lendUpstream(client: message.name, clientLength: message.nameLength, key: key, listener: listener, local: message.destination) else {
                stats.add(.dropsNoEndpoint, listener: listener)
                return nil
            }
            return lent
        }
        if let found = datagrams.sessions.find(key) {
            datagrams.sessions.touch(found, tick: clock.tick)
            return found
        }
        var place: UInt32 = 0
        if let rule, rule.limitsNewSources {
            place = admitNewSource(message.name, rule, listener: listener)
            // A new session from a limited source: over its budget, dropped (counted).
            if place == Worker.limitedVerdict { return nil }
        }
        guard let opened = openSession(key, client: message.name, clientLength: message.nameLength, listener: listener, local: message.destination) else {
            leaveSource(place)
            stats.add(.dropsNoEndpoint, listener: listener)
            return nil
        }
        if place != 0 { datagrams.sessions[opened].sourcePlace = place }
        return opened
    }

    func datagramSentUpstream(_ completion: Completion, buffer: UInt16, listener: Int) {
        datagrams.buffers.recycle(buffer)
        if completion.result < 0 { stats.add(.dropsSendFailed, listener: listener) }
    }

    // MARK: Sessions

    /// A session for a new client: the balancer's pick, a connected socket to it, and a
    /// multishot receive for its replies. Nil when no endpoint can take it.
    func openSession(_ key: UDPClientKey, client: UnsafeRawPointer, clientLength: Int, listener: Int, local: PacketDestination?) -> UInt32? {
        guard let (position, endpoint, cluster) = pickUpstream(client: client, clientLength: clientLength, listener: listener) else { return nil }
        return openUpstream(key, position: position, endpoint: endpoint, cluster: cluster, client: client, clientLength: clientLength, local: local,
                            listener: listener, indexed: true)
    }

    /// Per-packet mode: the balancer picks for this datagram alone, and a pooled socket to
    /// that endpoint (or a new one) is lent to its client until the replies are in.
    func lendUpstream(client: UnsafeRawPointer, clientLength: Int, key: UDPClientKey, listener: Int, local: PacketDestination?) -> UInt32? {
        guard let (position, endpoint, cluster) = pickUpstream(client: client, clientLength: clientLength, listener: listener) else { return nil }
        guard let slot = datagrams.sessions.takePooled(listener: listener, endpoint: endpoint) else {
            return openUpstream(key, position: position, endpoint: endpoint, cluster: cluster, client: client, clientLength: clientLength, local: local,
                                listener: listener, indexed: false)
        }
        setClient(slot, client, clientLength, local: local)
        datagrams.sessions.touch(slot, tick: clock.tick)
        beginLease(slot)
        return slot
    }

    /// The balancer's pick for a new session or datagram: endpoint position, identity and
    /// cluster identity.
    func pickUpstream(client: UnsafeRawPointer, clientLength: Int, listener: Int) -> (Int, Int, Int)? {
        let plan = plans.current
        let cluster = plan.clusterSplits[listener].flatMap { plan.listenerClusters[listener][$0.pick()!] } ?? plan.listenerClusters[listener][0]
        let firstEndpoint = plan.firstEndpoints[cluster]
        let clusterID = plan.clusterIDs[cluster]
        let snapshot = plan.snapshot
        let ids = snapshot.endpointIDs + firstEndpoint
        let flowHash = plan.balancers[cluster].usesFlowHash ? FlowHash.compute(peer: client, length: clientLength, key: plan.hashKeys[cluster]) : 0
        guard let local = plan.balancers[cluster].pick(
            flowHash: flowHash, tried: 0, active: ActiveCounts(base: active.byEndpoint, ids: ids),
            clusterActive: active.byCluster[clusterID], endpoints: shared.status.view(snapshot, firstEndpoint: firstEndpoint))
        else { return nil }
        return (firstEndpoint + local, Int(ids[local]), clusterID)
    }

    /// A record with a socket connected to the endpoint at `position`, lent to `client`.
    func openUpstream(_ key: UDPClientKey, position: Int, endpoint: Int, cluster: Int, client: UnsafeRawPointer, clientLength: Int,
                      local: PacketDestination?, listener: Int, indexed: Bool) -> UInt32? {
        let plan = plans.current
        if datagrams.sessions.counts[listener] >= plan.maxSessions[listener], let oldest = longestIdleSession(listener) {
            endSession(oldest, reason: .evicted)
            stats.add(.sessionsEvicted, listener: listener)
        }
        let address = UnsafeMutableRawPointer(plan.endpointAddresses + position).assumingMemoryBound(to: sockaddr.self)
        let fd: Int32
        do throws(Errno) {
            fd = try SocketCalls.open(family: Int32(address.pointee.sa_family), type: Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue))
        } catch {
            noteResourceError(error, while: "opening an upstream UDP socket")
            return nil
        }
        // A UDP connect only sets the peer: it does not wait.
        do throws(Errno) {
            try SocketCalls.connect(fd, to: address, length: plan.endpointAddressLengths[position])
        } catch {
            SocketCalls.close(fd)
            stats.add(.connectFailures, endpoint: endpoint)
            return nil
        }
        let slot = datagrams.sessions.insert(key, listener: UInt16(listener), tick: clock.tick, indexed: indexed)
        datagrams.sessions[slot].upstream = fd
        datagrams.sessions[slot].endpoint = Int32(endpoint)
        datagrams.sessions[slot].cluster = Int32(cluster)
        setClient(slot, client, clientLength, local: local)
        armReplies(slot)
        beginLease(slot)
        // `relay: kernel`: the session's later datagrams need not come through here.
        if indexed, local == nil, plan.kernelRelay[listener] != nil { relayInKernel(slot, listener: listener, endpoint: UnsafeRawPointer(address)) }
        return slot
    }

    /// Where replies go: the client's address, and the local one they leave from on a
    /// wildcard-bound listener.
    private func setClient(_ slot: UInt32, _ client: UnsafeRawPointer, _ clientLength: Int, local: PacketDestination?) {
        datagrams.sessions[slot].local = local
        let length = min(clientLength, MemoryLayout<sockaddr_in6>.size)
        datagrams.sessions[slot].clientLength = socklen_t(length)
        withUnsafeMutableBytes(of: &datagrams.sessions[slot].client) { $0.copyMemory(from: UnsafeRawBufferPointer(start: client, count: length)) }
    }

    /// A client starts using the record: a session (or one datagram's exchange) begins.
    private func beginLease(_ slot: UInt32) {
        let session = datagrams.sessions[slot]
        let endpoint = Int(session.endpoint), listener = Int(session.listener)
        datagrams.sessions[slot].leased = true
        datagrams.sessions[slot].replies = 0
        datagrams.sessions[slot].requests = 0
        datagrams.sessions[slot].startedAt = clock.milliseconds
        datagrams.sessions[slot].bytesFromClient = 0
        datagrams.sessions[slot].bytesFromUpstream = 0
        active.byEndpoint[endpoint] += 1
        active.byCluster[Int(session.cluster)] += 1
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        stats.add(.active, endpoint: endpoint)
        stats.add(.total, endpoint: endpoint)
    }

    /// The client's exchange is over: a per-client session ends; a per-packet record goes
    /// back to its pool, its socket still open and receiving.
    func endLease(_ slot: UInt32) {
        let session = datagrams.sessions[slot]
        guard session.live, session.leased else { return }
        if session.indexed {
            endSession(slot, reason: .responses)
            return
        }
        if accessLog != nil { logSessionEnded(slot, reason: .responses) }
        releaseLeaseCounts(slot)
        datagrams.sessions.pool(slot)
    }

    /// Gives back what `beginLease` counted.
    private func releaseLeaseCounts(_ slot: UInt32) {
        let session = datagrams.sessions[slot]
        datagrams.sessions[slot].leased = false
        let endpoint = Int(session.endpoint)
        active.byEndpoint[endpoint] -= 1
        active.byCluster[Int(session.cluster)] -= 1
        stats.add(.active, listener: Int(session.listener), UInt64(bitPattern: -1))
        stats.add(.active, endpoint: endpoint, UInt64(bitPattern: -1))
    }

    func armReplies(_ slot: UInt32) {
        let session = datagrams.sessions[slot]
        datagrams.sessions[slot].receiveArmed = ring.prepareMultishotReceive(
            socket: session.upstream, bufferGroup: Worker.datagramBufferGroup,
            userData: UserData(.datagramFromUpstream, slot: slot, generation: session.generation).raw)
        if !datagrams.sessions[slot].receiveArmed {
            stats.add(.submissionDrops)
            datagrams.repliesToRearm.append(slot)
        }
    }

    /// Ends a session (or closes a per-packet record): its receive is cancelled (its
    /// completion arrives stale and is ignored), its socket closed, its counts given back.
    func endSession(_ slot: UInt32, reason: EndReason) {
        guard datagrams.sessions[slot].live else { return }
        // The kernel's last counts first, so the access log and stats have them.
        if datagrams.sessions[slot].relayed { endRelay(slot) }
        let session = datagrams.sessions[slot]
        if session.leased {
            if accessLog != nil { logSessionEnded(slot, reason: reason) }
            releaseLeaseCounts(slot)
        }
        if session.receiveArmed {
            _ = ring.prepareCancel(target: UserData(.datagramFromUpstream, slot: slot, generation: session.generation).raw, userData: UserData(.cancel).raw)
        }
        // Closed after the next submit: a send to it may still be queued in this batch, and
        // the number must not go to a new session's socket before that send is issued.
        datagrams.upstreamsToClose.append(session.upstream)
        leaveSource(session.sourcePlace)
        datagrams.sessions.remove(slot)
    }

    /// Sessions idle for their listener's `idle_timeout` end; receives that stopped for
    /// want of a buffer start again.
    func expireSessions() {
        for listener in listeners.served where plans.current.listenerIsUDP[listener] {
            let idle = plans.current.idleTicks[listener]
            while let oldest = datagrams.sessions.oldest(listener), clock.tick &- datagrams.sessions[oldest].lastTick >= idle {
                // The kernel may have carried datagrams since: idle only if it has not.
                if datagrams.sessions[oldest].relayed, moveUpToKernelActivity(oldest), clock.tick &- datagrams.sessions[oldest].lastTick < idle { continue }
                // A pooled per-packet socket unused this long closes quietly; a lease
                // still waiting for its reply expires like a session.
                if datagrams.sessions[oldest].leased { stats.add(.idleTimeouts, listener: listener) }
                endSession(oldest, reason: .idleTimeout)
            }
        }
        rearmWaitingReplies()
    }

    /// Session receives that stopped start again (a slot may have been freed meanwhile, or
    /// the whole table given back).
    func rearmWaitingReplies() {
        while let slot = datagrams.repliesToRearm.popLast() {
            if Int(slot) < datagrams.sessions.sessions.count, datagrams.sessions[slot].live, !datagrams.sessions[slot].receiveArmed { armReplies(slot) }
        }
    }

    /// Receives that stopped for want of a buffer start again, now that one is free.
    func rearmDatagramReceives() {
        datagrams.receivesWaiting = false
        guard !draining else { return }
        for listener in listeners.served where listeners[listener].isDatagram && !listeners[listener].armed && listeners[listener].fd >= 0 {
            armDatagrams(listener)
        }
        rearmWaitingReplies()
    }

    func endAllSessions() {
        for listener in 0..<datagrams.sessions.counts.count {
            while let slot = datagrams.sessions.oldest(listener) { endSession(slot, reason: .drain) }
        }
    }
}
