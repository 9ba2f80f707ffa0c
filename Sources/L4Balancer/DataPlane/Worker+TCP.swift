import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The TCP proxy: accept → pick an endpoint → connect (retrying elsewhere) → relay both
/// directions with at most one request in flight each → half-close → close once.
extension Worker {
    // MARK: Relay

    func startProxying(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        record.pointee.move(to: .proxying)
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
        } else if buffers.multishotSmallReceives {
            queued = ring.prepareMultishotReceive(
                socket: socket, bufferGroup: Worker.smallBufferGroup, limit: UInt32(buffers.small.bufferSize), userData: userData)
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
        buffers.waiters.push(BufferWaitQueue.entry(slot: slot, toUpstream: toUpstream), priority: stuck ? .later : .first)
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
        stream(record, toUpstream: toUpstream).pointee.hold(buffer, length: length, large: large, at: clock.tick)
        sendPending(slot, record, toUpstream: toUpstream)
    }

    func received(_ completion: Completion, _ userData: UserData, toUpstream: Bool, large: Bool) {
        guard let (record, s) = beginReceive(completion, userData, toUpstream: toUpstream, large: large, duringOpening: false) else { return }
        let slot = userData.slot
        let buffer = completion.bufferID
        let more = completion.hasMore
        let result = completion.result
        if result > 0, let buffer {
            noteReceiveSize(s, result, large: large)
            record.pointee.lastActivity = clock.tick
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
            if let slots = side.access, slots[Int(slot)].firstFIN == 0 {
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
        } else if retryReceive(slot, record, s, toUpstream: toUpstream, large: large, completion, ready: s.pointee.state == .receiving) {
            return
        } else if !more || result < 0 {
            close(slot, reason: result < 0 ? Worker.reason(result) : nil)
        }
    }

    /// A direction's buffer size follows its reads: one that fills a small buffer moves to
    /// large ones (bulk), one that would fit a small buffer moves back.
    @inline(__always)
    func noteReceiveSize(_ s: UnsafeMutablePointer<Connection.Stream>, _ length: Int32, large: Bool) {
        if !large, Int(length) == buffers.small.bufferSize {
            s.pointee.prefersLarge = true
        } else if large, Int(length) < buffers.small.bufferSize {
            s.pointee.prefersLarge = false
        }
    }

    /// A receive that ended for want of a buffer, or was cancelled: armed again (with small
    /// buffers, or once one is free) if the direction takes bytes now (`ready`). False for
    /// any other result, which the caller handles.
    @inline(__always)
    func retryReceive(
        _ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, _ s: UnsafeMutablePointer<Connection.Stream>,
        toUpstream: Bool, large: Bool, _ completion: Completion, ready: Bool
    ) -> Bool {
        switch completion.error {
        case .noBufferSpace? where large:
            // Large buffers are few: fall back to small ones rather than wait.
            s.pointee.prefersLarge = false
            if ready { armReceive(slot, record, toUpstream: toUpstream) }
        case .noBufferSpace?:
            // Nothing held: wait for buffers. Sending: re-armed when the send completes.
            stats.add(.bufferWaits, listener: Int(record.pointee.listener))
            if ready { waitForBuffer(slot, record, toUpstream: toUpstream) }
        case .canceled? where !completion.hasMore:
            if ready { armReceive(slot, record, toUpstream: toUpstream) }
        default:
            return false
        }
        return true
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
            if let slots = side.access { slots[Int(slot)].bytesFromClient &+= UInt64(count) }
        } else {
            stats.add(.bytesOut, listener: listener, UInt64(count))
            stats.add(.bytesIn, endpoint: endpoint, UInt64(count))
            if let slots = side.access { slots[Int(slot)].bytesFromUpstream &+= UInt64(count) }
        }
    }

    /// Bytes that arrived while a send is in flight: copied onto the end of the buffer
    /// being sent, or of the one waiting behind it, or kept as that one. By the receive's
    /// limit one arm never needs more (`Connection.Stream`).
    @inline(__always)
    func absorb(_ slot: UInt32, _ buffer: UInt16, length: Int32, into s: UnsafeMutablePointer<Connection.Stream>) {
        let capacity = Int32(buffers.small.bufferSize)
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
        guard let record = sentRecord(userData) else { return }
        let slot = userData.slot
        let s = stream(record, toUpstream: toUpstream)
        guard record.pointee.state == .proxying, completion.result > 0 else {
            recycle(s.pointee.buffer, large: s.pointee.large)
            if record.pointee.state == .proxying { close(slot, reason: Worker.reason(completion.result)) } else { finishClosing(slot) }
            return
        }
        s.pointee.sent += completion.result
        record.pointee.lastActivity = clock.tick
        s.pointee.sendProgress = clock.tick
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
        // Fails only when the peer has reset the socket already: the other direction's
        // next receive or send then reports it and closes the connection.
        try? SocketCalls.shutdown(destination(record, toUpstream: toUpstream), Int32(SHUT_WR))
    }

    /// A closing connection gives back the buffer waiting behind a send; the one being
    /// sent goes back when that send completes (cancelled).
    func dropPending(_ s: UnsafeMutablePointer<Connection.Stream>) {
        if s.pointee.pending != Connection.Stream.noBuffer {
            recycle(s.pointee.pending, large: false)
            s.pointee.pending = Connection.Stream.noBuffer
        }
    }
}
