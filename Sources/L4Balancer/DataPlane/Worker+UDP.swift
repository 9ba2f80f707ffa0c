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
        acceptArmed[listener] = ring.prepareMultishotReceiveMessage(
            socket: listenerFDs[listener], message: datagramHeader, bufferGroup: Worker.datagramBufferGroup,
            userData: UserData(.datagramFromClient, slot: UInt32(listener), generation: listenerSerials[listener]).raw)
        if !acceptArmed[listener] { stats.add(.submissionDrops) }
    }

    func datagramFromClient(_ completion: Completion, listener: Int, serial: UInt32) {
        let live = serial == listenerSerials[listener] && listenerFDs[listener] >= 0
        if !completion.hasMore, live {
            acceptArmed[listener] = false
            // Out of buffers: re-armed once one is recycled (the datagrams wait in the
            // socket's queue meanwhile; the kernel drops and counts beyond it).
            if completion.result == -ENOBUFS {
                datagramReceivesWaiting = true
            } else if completion.result >= 0, !draining {
                armDatagrams(listener)
            }
        }
        guard let buffer = completion.bufferID else {
            // No buffer free: the datagram waits in the socket until a buffer is recycled.
            if completion.result == -ENOBUFS { stats.add(.bufferWaits, listener: listener) }
            return
        }
        datagramBuffers.handedOut()
        guard completion.result >= 0, live, !draining else {
            datagramBuffers.recycle(buffer)
            return
        }
        guard let message = ReceivedMessage(buffer: datagramBuffers.address(of: buffer), length: completion.result, message: datagramHeader),
              !message.truncated, let key = UDPClientKey(message.name, length: message.nameLength)
        else {
            datagramBuffers.recycle(buffer)
            stats.add(.dropsMalformed, listener: listener)
            return
        }
        if sourceFilter.enforcing {
            // The user-space blocklist, per datagram (as XDP would have dropped it).
            let verdict = sourceFilter.verdict(address: message.name, port: current.listenerPorts[listener], transport: .udp)
            stats.add(.filterCounter(verdict))
            if verdict.drops {
                datagramBuffers.recycle(buffer)
                return
            }
        }
        let plan = current
        let rule = plan.rateRules[listener]
        if let rule, rule.packetInterval > 0, !admitDatagram(message.name, rule, listener: listener) {
            datagramBuffers.recycle(buffer)
            return
        }
        let session: UInt32
        if plan.perPacket[listener] {
            guard let lent = lendUpstream(client: message.name, clientLength: message.nameLength, key: key, listener: listener, local: message.destination) else {
                datagramBuffers.recycle(buffer)
                stats.add(.dropsNoEndpoint, listener: listener)
                return
            }
            session = lent
        } else if let found = udpSessions.find(key) {
            session = found
            udpSessions.touch(found, tick: nowTick)
        } else if let rule, rule.limitsNewSources, case let place = admitNewSource(message.name, rule, listener: listener), place != 0 {
            // A new session from a limited source: over its budget, dropped (counted).
            guard place != Worker.limitedVerdict,
                  let opened = openSession(key, client: message.name, clientLength: message.nameLength, listener: listener, local: message.destination)
            else {
                if place != Worker.limitedVerdict {
                    leaveSource(place)
                    stats.add(.dropsNoEndpoint, listener: listener)
                }
                datagramBuffers.recycle(buffer)
                return
            }
            udpSessions[opened].sourcePlace = place
            session = opened
        } else if let opened = openSession(key, client: message.name, clientLength: message.nameLength, listener: listener, local: message.destination) {
            session = opened
        } else {
            datagramBuffers.recycle(buffer)
            stats.add(.dropsNoEndpoint, listener: listener)
            return
        }
        let length = message.payloadLength
        guard ring.prepareSend(socket: udpSessions[session].upstream, bytes: message.payload, length: length,
                               userData: UserData(.datagramToUpstream, slot: UInt32(buffer), generation: UInt32(listener)).raw)
        else {
            datagramBuffers.recycle(buffer)
            stats.add(.dropsQueueFull, listener: listener)
            if plan.perPacket[listener] { endLease(session) }
            return
        }
        stats.add(.datagramsIn, listener: listener)
        stats.add(.bytesIn, listener: listener, UInt64(length))
        stats.add(.bytesOut, endpoint: Int(udpSessions[session].endpoint), UInt64(length))
        udpSessions[session].bytesFromClient &+= UInt64(length)
        udpSessions[session].requests &+= 1
        // No reply expected (`proxy_responses: 0`): the socket can serve the next datagram.
        if plan.proxyResponses[listener] == 0 { endLease(session) }
    }

    func datagramSentUpstream(_ completion: Completion, buffer: UInt16, listener: Int) {
        datagramBuffers.recycle(buffer)
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
        guard let slot = udpSessions.takePooled(listener: listener, endpoint: endpoint) else {
            return openUpstream(key, position: position, endpoint: endpoint, cluster: cluster, client: client, clientLength: clientLength, local: local,
                                listener: listener, indexed: false)
        }
        setClient(slot, client, clientLength, local: local)
        udpSessions.touch(slot, tick: nowTick)
        beginLease(slot)
        return slot
    }

    /// The balancer's pick for a new session or datagram: endpoint position, identity and
    /// cluster identity.
    func pickUpstream(client: UnsafeRawPointer, clientLength: Int, listener: Int) -> (Int, Int, Int)? {
        let plan = current
        let cluster = plan.clusterSplits[listener].flatMap { plan.listenerClusters[listener][$0.pick()!] } ?? plan.listenerClusters[listener][0]
        let firstEndpoint = plan.firstEndpoints[cluster]
        let clusterID = plan.clusterIDs[cluster]
        let snapshot = plan.snapshot
        let ids = snapshot.endpointIDs + firstEndpoint
        let flowHash = plan.balancers[cluster].usesFlowHash ? FlowHash.compute(peer: client, length: clientLength, key: plan.hashKeys[cluster]) : 0
        guard let local = plan.balancers[cluster].pick(
            flowHash: flowHash, tried: 0, active: ActiveCounts(base: activeByEndpoint, ids: ids),
            clusterActive: activeByCluster[clusterID], endpoints: status.view(snapshot, firstEndpoint: firstEndpoint))
        else { return nil }
        return (firstEndpoint + local, Int(ids[local]), clusterID)
    }

    /// A record with a socket connected to the endpoint at `position`, lent to `client`.
    func openUpstream(_ key: UDPClientKey, position: Int, endpoint: Int, cluster: Int, client: UnsafeRawPointer, clientLength: Int,
                      local: PacketDestination?, listener: Int, indexed: Bool) -> UInt32? {
        let plan = current
        if udpSessions.counts[listener] >= plan.maxSessions[listener], let oldest = longestIdleSession(listener) {
            endSession(oldest, reason: .evicted)
            stats.add(.sessionsEvicted, listener: listener)
        }
        let address = UnsafeMutableRawPointer(plan.endpointAddresses + position).assumingMemoryBound(to: sockaddr.self)
        let fd = socket(Int32(address.pointee.sa_family), Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            noteResourceError(errno, while: "opening an upstream UDP socket")
            return nil
        }
        // A UDP connect only sets the peer: it does not wait.
        guard connect(fd, address, plan.endpointAddressLengths[position]) == 0 else {
            Glibc.close(fd)
            stats.add(.connectFailures, endpoint: endpoint)
            return nil
        }
        let slot = udpSessions.insert(key, listener: UInt16(listener), tick: nowTick, indexed: indexed)
        udpSessions[slot].upstream = fd
        udpSessions[slot].endpoint = Int32(endpoint)
        udpSessions[slot].cluster = Int32(cluster)
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
        udpSessions[slot].local = local
        let length = min(clientLength, MemoryLayout<sockaddr_in6>.size)
        udpSessions[slot].clientLength = socklen_t(length)
        withUnsafeMutableBytes(of: &udpSessions[slot].client) { $0.copyMemory(from: UnsafeRawBufferPointer(start: client, count: length)) }
    }

    /// A client starts using the record: a session (or one datagram's exchange) begins.
    private func beginLease(_ slot: UInt32) {
        let session = udpSessions[slot]
        let endpoint = Int(session.endpoint), listener = Int(session.listener)
        udpSessions[slot].leased = true
        udpSessions[slot].replies = 0
        udpSessions[slot].requests = 0
        udpSessions[slot].startedAt = nowMilliseconds
        udpSessions[slot].bytesFromClient = 0
        udpSessions[slot].bytesFromUpstream = 0
        activeByEndpoint[endpoint] += 1
        activeByCluster[Int(session.cluster)] += 1
        stats.add(.accepted, listener: listener)
        stats.add(.active, listener: listener)
        stats.add(.active, endpoint: endpoint)
        stats.add(.total, endpoint: endpoint)
    }

    /// The client's exchange is over: a per-client session ends; a per-packet record goes
    /// back to its pool, its socket still open and receiving.
    func endLease(_ slot: UInt32) {
        let session = udpSessions[slot]
        guard session.live, session.leased else { return }
        if session.indexed {
            endSession(slot, reason: .responses)
            return
        }
        if accessLog != nil { logSessionEnded(slot, reason: .responses) }
        releaseLeaseCounts(slot)
        udpSessions.pool(slot)
    }

    /// Gives back what `beginLease` counted.
    private func releaseLeaseCounts(_ slot: UInt32) {
        let session = udpSessions[slot]
        udpSessions[slot].leased = false
        let endpoint = Int(session.endpoint)
        activeByEndpoint[endpoint] -= 1
        activeByCluster[Int(session.cluster)] -= 1
        stats.add(.active, listener: Int(session.listener), UInt64(bitPattern: -1))
        stats.add(.active, endpoint: endpoint, UInt64(bitPattern: -1))
    }

    func armReplies(_ slot: UInt32) {
        let session = udpSessions[slot]
        udpSessions[slot].receiveArmed = ring.prepareMultishotReceive(
            socket: session.upstream, bufferGroup: Worker.datagramBufferGroup,
            userData: UserData(.datagramFromUpstream, slot: slot, generation: session.generation).raw)
        if !udpSessions[slot].receiveArmed {
            stats.add(.submissionDrops)
            repliesToRearm.append(slot)
        }
    }

    /// Ends a session (or closes a per-packet record): its receive is cancelled (its
    /// completion arrives stale and is ignored), its socket closed, its counts given back.
    func endSession(_ slot: UInt32, reason: EndReason) {
        guard udpSessions[slot].live else { return }
        // The kernel's last counts first, so the access log and stats have them.
        if udpSessions[slot].relayed { endRelay(slot) }
        let session = udpSessions[slot]
        if session.leased {
            if accessLog != nil { logSessionEnded(slot, reason: reason) }
            releaseLeaseCounts(slot)
        }
        if session.receiveArmed {
            _ = ring.prepareCancel(target: UserData(.datagramFromUpstream, slot: slot, generation: session.generation).raw, userData: UserData(.cancel).raw)
        }
        // Closed after the next submit: a send to it may still be queued in this batch, and
        // the number must not go to a new session's socket before that send is issued.
        upstreamsToClose.append(session.upstream)
        leaveSource(session.sourcePlace)
        udpSessions.remove(slot)
    }

    /// Sessions idle for their listener's `idle_timeout` end; receives that stopped for
    /// want of a buffer start again.
    func expireSessions() {
        for listener in servedListeners where current.listenerIsUDP[listener] {
            let idle = current.idleTicks[listener]
            while let oldest = udpSessions.oldest(listener), nowTick &- udpSessions[oldest].lastTick >= idle {
                // The kernel may have carried datagrams since: idle only if it has not.
                if udpSessions[oldest].relayed, moveUpToKernelActivity(oldest), nowTick &- udpSessions[oldest].lastTick < idle { continue }
                // A pooled per-packet socket unused this long closes quietly; a lease
                // still waiting for its reply expires like a session.
                if udpSessions[oldest].leased { stats.add(.idleTimeouts, listener: listener) }
                endSession(oldest, reason: .idleTimeout)
            }
        }
        rearmWaitingReplies()
    }

    /// Session receives that stopped start again (a slot may have been freed meanwhile, or
    /// the whole table given back).
    func rearmWaitingReplies() {
        while let slot = repliesToRearm.popLast() {
            if Int(slot) < udpSessions.sessions.count, udpSessions[slot].live, !udpSessions[slot].receiveArmed { armReplies(slot) }
        }
    }

    /// Receives that stopped for want of a buffer start again, now that one is free.
    func rearmDatagramReceives() {
        datagramReceivesWaiting = false
        guard !draining else { return }
        for listener in servedListeners where listenerIsDatagram[listener] && !acceptArmed[listener] && listenerFDs[listener] >= 0 {
            armDatagrams(listener)
        }
        rearmWaitingReplies()
    }

    func endAllSessions() {
        for listener in 0..<udpSessions.counts.count {
            while let slot = udpSessions.oldest(listener) { endSession(slot, reason: .drain) }
        }
    }
}
