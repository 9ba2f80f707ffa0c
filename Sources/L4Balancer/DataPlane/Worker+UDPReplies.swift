import BPFSteer
import URing

#if canImport(Glibc)
import Glibc
#endif

/// UDP from upstreams: replies relayed to their session's client (or, per packet, its lease),
/// and the bookkeeping when they are sent.
extension Worker {
    func datagramFromUpstream(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        let valid = Int(slot) < datagrams.sessions.sessions.count && datagrams.sessions[slot].live && datagrams.sessions[slot].generation == userData.generation
        if let buffer = completion.bufferID {
            datagrams.buffers.handedOut()
            guard valid, completion.result >= 0 else {
                datagrams.buffers.recycle(buffer)
                if valid, !completion.hasMore {
                    datagrams.sessions[slot].receiveArmed = false
                    datagrams.repliesToRearm.append(slot)
                }
                return
            }
        }
        guard valid else { return }
        if !completion.hasMore { datagrams.sessions[slot].receiveArmed = false }
        let session = datagrams.sessions[slot]
        let listener = Int(session.listener)
        guard completion.result >= 0, let buffer = completion.bufferID else {
            if completion.result == 0 {
                relayEmptyReply(slot)
                return
            }
            switch completion.error {
            case .connectionRefused?:
                // ICMP port unreachable: the endpoint is not there. The client's next
                // datagram opens a new session; outlier detection sees the failure.
                stats.add(.connectFailures, endpoint: Int(session.endpoint))
                endSession(slot, reason: .portUnreachable)
            case .noBufferSpace?:
                stats.add(.bufferWaits, listener: listener)
                datagrams.repliesToRearm.append(slot)
                datagrams.receivesWaiting = true
            default:
                if !datagrams.sessions[slot].receiveArmed { datagrams.repliesToRearm.append(slot) }
            }
            return
        }
        if !datagrams.sessions[slot].receiveArmed { armReplies(slot) }
        guard replyIsAwaited(slot, session) else {
            datagrams.buffers.recycle(buffer)
            return
        }
        let length = Int(completion.result)
        let fd = listeners[listener].fd
        // The reply leaves from the listener's socket, to the client's address (a copy:
        // the session may end before the send completes).
        let message = datagrams.replies + Int(buffer)
        (datagrams.replyNames + Int(buffer)).pointee = session.client
        (datagrams.replyVectors + Int(buffer)).pointee = iovec(iov_base: datagrams.buffers.address(of: buffer), iov_len: length)
        message.pointee.msg_name = UnsafeMutableRawPointer(datagrams.replyNames + Int(buffer))
        message.pointee.msg_namelen = session.clientLength
        message.pointee.msg_iov = datagrams.replyVectors + Int(buffer)
        message.pointee.msg_iovlen = 1
        if let local = session.local {
            // A wildcard-bound listener: the reply leaves from the address the client used.
            let control = datagrams.replyControls + Int(buffer) * PacketDestination.controlSpace
            message.pointee.msg_control = control
            message.pointee.msg_controllen = local.writeSourceControl(into: control)
        } else {
            message.pointee.msg_control = nil
            message.pointee.msg_controllen = 0
        }
        guard fd >= 0, ring.prepareSendMessage(socket: fd, message: message, userData: UserData.datagram(.datagramToClient, buffer: buffer, listener: listener).raw) else {
            datagrams.buffers.recycle(buffer)
            stats.add(.dropsQueueFull, listener: listener)
            return
        }
        stats.add(.bytesOut, listener: listener, UInt64(length))
        stats.add(.bytesIn, endpoint: Int(session.endpoint), UInt64(length))
        datagrams.sessions[slot].bytesFromUpstream &+= UInt64(length)
        // The send above has its own copy of the client's address.
        replySent(slot, listener: listener)
    }

    /// Whether a reply on `slot` has a client waiting for it; if not (a pooled socket, or
    /// `proxy_responses: 0`) it is counted as late and the socket closed, so that an
    /// upstream sending more than it should can never answer the next client that borrows
    /// it. A reply that is awaited keeps the session alive.
    @inline(__always)
    func replyIsAwaited(_ slot: UInt32, _ session: UDPSessionTable.Session) -> Bool {
        let listener = Int(session.listener)
        guard session.leased, plans.current.proxyResponses[listener] > 0 || session.indexed else {
            stats.add(.dropsLateReply, listener: listener)
            endSession(slot, reason: .responses)
            return false
        }
        datagrams.sessions.touch(slot, tick: clock.tick)
        return true
    }

    /// A reply went to the client: `proxy_responses` (as nginx's: replies per client
    /// datagram) may have completed the exchange.
    @inline(__always)
    func replySent(_ slot: UInt32, listener: Int) {
        stats.add(.datagramsOut, listener: listener)
        datagrams.sessions[slot].replies &+= 1
        let expected = plans.current.proxyResponses[listener]
        if expected != .max, UInt64(datagrams.sessions[slot].replies) >= UInt64(expected) * UInt64(datagrams.sessions[slot].requests) { endLease(slot) }
    }

    /// A zero-length reply is a datagram like any other, but the kernel selects no buffer
    /// for it (and ends the multishot receive): it is sent on at once with a plain sendmsg
    /// from the listener's socket, and counted.
    @inline(never)
    func relayEmptyReply(_ slot: UInt32) {
        if !datagrams.sessions[slot].receiveArmed { armReplies(slot) }
        let session = datagrams.sessions[slot]
        guard replyIsAwaited(slot, session) else { return }
        let listener = Int(session.listener)
        var client = session.client
        let sent = withUnsafeTemporaryAllocation(byteCount: PacketDestination.controlSpace, alignment: 8) { control in
            withUnsafeMutablePointer(to: &client) { name in
                var message = msghdr()
                message.msg_name = UnsafeMutableRawPointer(name)
                message.msg_namelen = session.clientLength
                if let local = session.local {
                    message.msg_control = control.baseAddress
                    message.msg_controllen = local.writeSourceControl(into: control.baseAddress!)
                }
                return sendmsg(listeners[listener].fd, &message, Int32(MSG_DONTWAIT))
            }
        }
        guard sent == 0 else {
            stats.add(.dropsSendFailed, listener: listener)
            return
        }
        replySent(slot, listener: listener)
    }

    func datagramSentToClient(_ completion: Completion, buffer: UInt16, listener: Int) {
        datagrams.buffers.recycle(buffer)
        if completion.result < 0 { stats.add(.dropsSendFailed, listener: listener) }
    }
}
