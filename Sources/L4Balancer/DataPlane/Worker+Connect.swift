import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// Connecting upstream: the endpoint choice (balancer, limits, retries on another endpoint),
/// the connect with its linked timeout, and the PROXY protocol header.
extension Worker {
    func startConnect(_ slot: UInt32) {
        let record = slab[slot]
        let listener = Int(record.pointee.listener)
        let plan = plans[record.pointee.plan]
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
        let fd: Int32
        do throws(Errno) {
            fd = try SocketCalls.open(family: Int32(address.pointee.sa_family), type: Int32(SOCK_STREAM.rawValue))
        } catch {
            noteResourceError(error, while: "opening an upstream socket")
            // The pick took a place on the endpoint (its max_connections); give it back.
            if record.pointee.endpointLimited {
                record.pointee.endpointLimited = false
                shared.status.leave(endpoint)
            }
            stats.add(.connectFailed, listener: listener)
            close(slot, reason: .connectFailed)
            return
        }
        setNoDelay(fd)
        record.pointee.upstream = fd
        record.pointee.endpoint = Int32(endpoint)
        if let slots = side.access { slots[Int(slot)].lastEndpoint = Int32(endpoint) }
        stats.add(.active, endpoint: endpoint)
        active.byEndpoint[endpoint] += 1
        active.byCluster[clusterID] += 1
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
        Worker.exclude(local, bits: &record.pointee.tried, others: side.tried(slot), count: &count)
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
        let view = shared.status.view(snapshot, firstEndpoint: firstEndpoint)
        let ids = snapshot.endpointIDs + firstEndpoint
        let limits = snapshot.endpointLimits + firstEndpoint
        let window = plan.slowStartMilliseconds[clusterIndex]
        // Tried endpoints, plus those skipped for this choice only (appended after them).
        var bits = record.pointee.tried
        let others = side.tried(slot)
        var otherCount = Int(record.pointee.triedAbove64)
        var fallback: Int?
        for _ in 0..<Worker.picksPerChoice {
            guard let local = plan.balancers[clusterIndex].pick(
                flowHash: record.pointee.flowHash, tried: TriedEndpoints(bits: bits, others: others, otherCount: otherCount),
                active: ActiveCounts(base: active.byEndpoint, ids: ids), clusterActive: active.byCluster[clusterID], endpoints: view)
            else { break }
            if window > 0 {
                let since = shared.status.availableSince(Int(ids[local]))
                let elapsed = clock.milliseconds - since
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
        guard shared.status.admit(id, limit: limit) else { return false }
        record.pointee.endpointLimited = true
        return true
    }

    func connected(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        guard let record = completedRecord(userData, expecting: .connecting) else { return }
        let endpoint = Int(record.pointee.endpoint)
        let listener = Int(record.pointee.listener)
        guard completion.result >= 0 else {
            stats.add(.connectFailures, endpoint: endpoint)
            // The linked timeout cancelled the connect.
            if completion.error == .canceled { stats.add(.connectTimeouts, endpoint: endpoint) }
            releaseEndpoint(record)
            Glibc.close(record.pointee.upstream)
            record.pointee.upstream = -1
            if Int(record.pointee.attempts) < plans[record.pointee.plan].connectAttempts[listener] {
                startConnect(slot)
            } else {
                stats.add(.connectFailed, listener: listener)
                close(slot, reason: .connectFailed)
            }
            return
        }
        // With TLS to the endpoint, a connection counts as made once its handshake is
        // (outlier detection weighs failed handshakes against these).
        if !plans[record.pointee.plan].wantsUpstreamTLS[Int(record.pointee.cluster)] {
            stats.add(.total, endpoint: endpoint)
        }
        record.pointee.lastActivity = clock.tick
        let version = plans[record.pointee.plan].proxyProtocols[listener]
        if version == .none {
            upstreamReady(slot, record)
            return
        }
        record.pointee.move(to: .sendingProxyHeader)
        if record.pointee.tls, version == .v2 {
            // With the TLS TLVs: longer than the per-slot header area, so from a buffer.
            startTLSProxyHeader(slot, record)
            return
        }
        let header = side.proxyHeader(slot)
        record.pointee.toUpstream.length = Int32(ProxyProtocolHeader.write(version: version, client: record.pointee.client, into: header))
        record.pointee.toUpstream.sent = 0
        sendProxyHeader(slot, record)
    }

    func sendProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let tlsHeader = record.pointee.tls ? side.tls[Int(slot)].headerBuffer : Connection.Stream.noBuffer
        let header = tlsHeader != Connection.Stream.noBuffer
            ? bufferAddress(tlsHeader, large: false) : side.proxyHeader(slot)
        let sent = Int(record.pointee.toUpstream.sent)
        queued(ring.prepareSend(
            socket: record.pointee.upstream, bytes: header + sent, length: Int(record.pointee.toUpstream.length) - sent,
            userData: UserData(.sendProxyHeader, slot: slot, generation: record.pointee.generation).raw), slot, record)
    }

    func proxyHeaderSent(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        guard let record = succeededRecord(completion, userData, expecting: .sendingProxyHeader) else { return }
        record.pointee.toUpstream.sent += completion.result
        if record.pointee.toUpstream.sent < record.pointee.toUpstream.length {
            sendProxyHeader(slot, record)
        } else {
            if record.pointee.tls, side.tls[Int(slot)].headerBuffer != Connection.Stream.noBuffer {
                recycle(side.tls[Int(slot)].headerBuffer, large: false)
                side.tls[Int(slot)].headerBuffer = Connection.Stream.noBuffer
            }
            upstreamReady(slot, record)
        }
    }
}
