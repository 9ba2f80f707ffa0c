internal import COpenSSL
import URing

#if canImport(Glibc)
import Glibc
#endif

/// Toward a TLS side: plaintext encrypted into records, and the ciphertext sent.
extension Worker {
    /// Plaintext from a plain side (`received`): held as the direction's buffer, then
    /// encrypted as the output BIO has room.
    func receivedPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, forTLSAtUpstream atUpstream: Bool,
                           buffer: UInt16, length: Int32, large: Bool) {
        let s = stream(record, toUpstream: atUpstream)
        if s.pointee.state == .sending {
            absorb(slot, buffer, length: length, into: s)
        } else {
            s.pointee.move(to: .sending)
            s.pointee.hold(buffer, length: length, large: large, at: clock.tick)
        }
        if record.pointee.state == .proxying { encryptFor(slot, record, atUpstream: atUpstream) }
    }

    /// Encrypts held plaintext for the TLS side `atUpstream` while its output BIO is
    /// below the high water, gives back (or refills) a plaintext buffer once OpenSSL has
    /// all of it, and sends the ciphertext; then close_notify after an EOF.
    func encryptFor(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let ssl = t.pointee.ssl
        let toUpstream = atUpstream
        let s = stream(record, toUpstream: toUpstream)
        let sourceIsTLS = isTLS(record, atUpstream: !atUpstream)
        while s.pointee.isSending, s.pointee.buffer != Connection.Stream.noBuffer,
              t.pointee.ciphertextPending < Worker.outputHighWater {
            let left = s.pointee.length - s.pointee.sent
            if left > 0 {
                let address = heldBytes(record, s, toUpstream: toUpstream) + Int(s.pointee.sent)
                let written = SSL_write(ssl, address, min(left, 16_384))
                guard written > 0 else {
                    ERR_clear_error()
                    stats.add(.tlsErrors, listener: Int(record.pointee.listener))
                    close(slot, reason: .error)
                    return
                }
                s.pointee.sent += written
                continue
            }
            // OpenSSL holds all of this buffer's bytes now.
            if sourceIsTLS {
                // TLS on both sides: refill the same buffer from the source.
                let pull = readPlaintext(slot, record, atUpstream: !atUpstream, into: s.pointee.buffer, large: s.pointee.large)
                if case .bytes(let count) = pull {
                    s.pointee.length = count
                    s.pointee.sent = 0
                    continue
                }
                recycle(s.pointee.buffer, large: s.pointee.large)
                s.pointee.buffer = Connection.Stream.noBuffer
                switch pull {
                case .failed:
                    close(slot, reason: .error)
                    return
                case .closedByPeer:
                    if s.pointee.state == .sending { s.pointee.move(to: .flushingBeforeEOF) }
                default:
                    if s.pointee.state == .sending {
                        if !s.pointee.receiveArmed { armReceive(slot, record, toUpstream: toUpstream) } else { s.pointee.move(to: .receiving) }
                    }
                }
                break
            }
            recycle(s.pointee.buffer, large: s.pointee.large)
            s.pointee.buffer = Connection.Stream.noBuffer
            if s.pointee.pending != Connection.Stream.noBuffer {
                s.pointee.buffer = s.pointee.pending
                s.pointee.pending = Connection.Stream.noBuffer
                s.pointee.large = false
                s.pointee.length = s.pointee.pendingLength
                s.pointee.sent = 0
                continue
            }
            if s.pointee.state == .sending {
                if !s.pointee.receiveArmed {
                    armReceive(slot, record, toUpstream: toUpstream)
                } else {
                    s.pointee.move(to: .receiving)
                }
            }
        }
        guard record.pointee.state == .proxying else { return }
        if s.pointee.state == .flushingBeforeEOF, s.pointee.buffer == Connection.Stream.noBuffer, !t.pointee.closeNotifyQueued {
            t.pointee.closeNotifyQueued = true
            SSL_shutdown(ssl)
            ERR_clear_error()
        }
        flushCiphertext(slot, record, atUpstream: atUpstream)
        if t.pointee.closeNotifyQueued, s.pointee.state == .flushingBeforeEOF,
           t.pointee.cipherBuffer == Connection.Stream.noBuffer, t.pointee.ciphertextPending == 0 {
            forwardEOF(slot, record, toUpstream: toUpstream)
        }
    }

    /// Starts sending what the side's output BIO holds, if no ciphertext send is in flight.
    func flushCiphertext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        guard t.pointee.cipherBuffer == Connection.Stream.noBuffer else { return }
        let pending = t.pointee.ciphertextPending
        guard pending > 0 else { return }
        if stream(record, toUpstream: atUpstream).pointee.state == .finished {
            // That socket is shut for writing (close_notify went before): what OpenSSL
            // writes now (an alert, a KeyUpdate answer) has nowhere to go.
            COpenSSL_bytes_clear(t.pointee.outputQueue)
            return
        }
        guard let buffer = buffers.small.take() else {
            // Every small buffer is out: try again on the next tick.
            buffers.retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        let count = COpenSSL_output_take(t.pointee.outputQueue, bufferAddress(buffer, large: false), min(pending, buffers.small.bufferSize))
        t.pointee.cipherBuffer = buffer
        t.pointee.cipherLength = Int32(count)
        t.pointee.cipherSent = 0
        sendCiphertext(slot, record, atUpstream: atUpstream)
    }

    func sendCiphertext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let sent = Int(t.pointee.cipherSent)
        guard ring.prepareSend(
            socket: atUpstream ? record.pointee.upstream : record.pointee.client,
            bytes: bufferAddress(t.pointee.cipherBuffer, large: false) + sent,
            length: Int(t.pointee.cipherLength) - sent,
            userData: UserData(atUpstream ? .sendCiphertextToUpstream : .sendCiphertextToClient, slot: slot, generation: record.pointee.generation).raw)
        else {
            // Never close from here: callers go on using the connection. The buffer stays
            // held (so no second send starts) and the send is tried again at the tick.
            stats.add(.submissionDrops)
            t.pointee.cipherUnsent = true
            buffers.retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        t.pointee.cipherUnsent = false
        record.pointee.inFlight += 1
    }

    func ciphertextSent(_ completion: Completion, _ userData: UserData, atUpstream: Bool) {
        guard let record = sentRecord(userData) else { return }
        let slot = userData.slot
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let state = record.pointee.state
        guard state != .closing, completion.result > 0 else {
            recycle(t.pointee.cipherBuffer, large: false)
            t.pointee.cipherBuffer = Connection.Stream.noBuffer
            if state == .closing { finishClosing(slot) } else { close(slot, reason: Worker.reason(completion.result)) }
            return
        }
        t.pointee.cipherSent += completion.result
        stream(record, toUpstream: atUpstream).pointee.sendProgress = clock.tick
        if state == .proxying { record.pointee.lastActivity = clock.tick }
        if t.pointee.cipherSent < t.pointee.cipherLength {
            sendCiphertext(slot, record, atUpstream: atUpstream)
            return
        }
        recycle(t.pointee.cipherBuffer, large: false)
        t.pointee.cipherBuffer = Connection.Stream.noBuffer
        if state == .proxying {
            encryptFor(slot, record, atUpstream: atUpstream)
        } else {
            flushCiphertext(slot, record, atUpstream: atUpstream)
            if t.pointee.closeAfterFlush, t.pointee.cipherBuffer == Connection.Stream.noBuffer { close(slot, reason: .error) }
        }
    }
}
