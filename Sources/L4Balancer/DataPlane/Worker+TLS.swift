internal import COpenSSL
import URing

#if canImport(Glibc)
import Glibc
#endif

/// One side's OpenSSL state for a TLS connection, in the worker's side tables by slot
/// (`side.tls` for the client side, `side.upstreamTLS` for the upstream; touched only by
/// TLS connections). Ciphertext from the peer goes to OpenSSL through `input`
/// (`input_bio.h`: a large receive is read where it lies, anything else copied) and the
/// receive buffer is reused for the plaintext OpenSSL reads out of it; ciphertext OpenSSL
/// writes to `output` (`output_bio.h`, a byte queue) goes to the peer in one small buffer
/// at a time.
struct TLSSlot {
    var ssl: OpaquePointer?
    var input: OpaquePointer?
    var output: OpaquePointer?
    /// What the two BIOs hold, read here directly (no BIO_ctrl per question).
    var inputState: UnsafeMutablePointer<COpenSSL_Input>?
    var outputQueue: UnsafeMutablePointer<COpenSSL_Bytes>?
    /// The small buffer carrying ciphertext to the peer (a send in flight), or none.
    var cipherBuffer = Connection.Stream.noBuffer
    var cipherLength: Int32 = 0
    var cipherSent: Int32 = 0
    /// Client side: the small buffer the PROXY v2 header (with its TLS TLVs) is sent from.
    var headerBuffer = Connection.Stream.noBuffer
    /// The PROXY v2 header found no free buffer: written at the tick.
    var headerUnwritten = false
    /// close_notify has been written (after the peer's EOF).
    var closeNotifyQueued = false
    /// The handshake failed: close once its alert has been sent.
    var closeAfterFlush = false
    /// This side's FIN came before the relay started (the other side still opening).
    var peerEnded = false
    /// `cipherBuffer` is filled but its send could not be queued: retried at the tick.
    var cipherUnsent = false
    /// Accept time (monotonic ms), for the handshake latency.
    var started: Int64 = 0
    /// In `inputReleasesAtTick`: the input BIO copied a large receive, and the memory that
    /// took is given back at the first tick that finds it read.
    var inputReleaseQueued = false
    /// An SSL_read failed other than for want of ciphertext (an error, close_notify), and
    /// the next read has to report it.
    var readEnded = false
}

/// TLS inside the worker (DESIGN §3): the same relay and buffer contract as plain TCP,
/// with OpenSSL between a socket and the buffers — on the client side (`listeners[].tls`,
/// l4lb the server), the upstream side (`clusters[].tls`, l4lb the client), or both.
/// `atUpstream` names the side a TLS step is about.
///
/// - From a TLS side: a receive brings ciphertext for that side's input BIO, and the same
///   buffer takes the plaintext `SSL_read` gives, which goes on to the other side (a plain
///   send, or encryption for it). When that completes, more plaintext is read into the
///   same buffer before the buffer is recycled; the receive is armed again only when
///   OpenSSL has no whole record left (`SSL_ERROR_WANT_READ`), so the BIO holds at most
///   one partial record plus one receive's worth.
/// - A large receive while the direction streams is lent to the BIO where it lies, not
///   copied, and its plaintext is written from the buffer's headroom on
///   (`plaintextHeadroom`). Plaintext never overtakes the ciphertext still to be read:
///   OpenSSL copies each record out before it decrypts it, a record's plaintext is shorter
///   than the record, and the one partial record OpenSSL may hold from the receive before
///   has at most `plaintextHeadroom` of plaintext. Any other receive is copied.
/// - Toward a TLS side: plaintext is held as the direction's buffer (`Connection.Stream`)
///   and encrypted into that side's output BIO while it holds less than `outputHighWater`;
///   the ciphertext goes out from one small buffer at a time. The plaintext buffer is
///   recycled (or refilled, when its source is TLS too) once OpenSSL has all of it.
/// - The client handshake runs before the upstream is connected (`handshake_timeout`
///   bounds it); the upstream handshake after the connect and PROXY header
///   (`connect_timeout` bounds it). An EOF toward a TLS side becomes close_notify, then a
///   half-close once it is sent.
extension Worker {
    /// Ciphertext waiting for a peer beyond which plaintext is not encrypted (two full
    /// records): that direction waits, as a plain send would.
    static let outputHighWater = 2 * (16_384 + 64)

    /// Room before each large buffer for plaintext read from TLS: the most one record holds.
    static let plaintextHeadroom = 16_384

    @inline(__always)
    func tlsSlot(_ slot: UInt32, atUpstream: Bool) -> UnsafeMutablePointer<TLSSlot> {
        (atUpstream ? side.upstreamTLS : side.tls) + Int(slot)
    }

    @inline(__always)
    func isTLS(_ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) -> Bool {
        atUpstream ? record.pointee.upstreamTLS : record.pointee.tls
    }

    // MARK: From a TLS side

    /// A receive on a TLS socket: ciphertext for OpenSSL. Small buffers, multishot; once
    /// a read fills one (bulk), large buffers, single-shot, as for plain TCP.
    func receivedCiphertext(_ completion: Completion, _ userData: UserData, large: Bool, atUpstream: Bool) {
        let toUpstream = !atUpstream
        guard let (record, s) = beginReceive(completion, userData, toUpstream: toUpstream, large: large, duringOpening: true) else { return }
        let slot = userData.slot
        let result = completion.result
        if result > 0, let buffer = completion.bufferID {
            ciphertextArrived(slot, record, s, buffer: buffer, length: result, large: large, atUpstream: atUpstream)
            return
        }
        if let buffer = completion.bufferID { recycle(buffer, large: large) }
        let state = record.pointee.state
        let handshaking: Connection.State = atUpstream ? .upstreamHandshaking : .handshaking
        // Whether this direction takes bytes now: a receive that ended without any is armed again.
        let ready = state == handshaking || (state == .proxying && s.pointee.state == .receiving)
        if result == 0 {
            guard state == .proxying else {
                if state == handshaking {
                    if atUpstream { upstreamHandshakeFailed(record) }
                    close(slot, reason: atUpstream ? .upstreamFIN : .clientFIN)
                } else {
                    tlsSlot(slot, atUpstream: atUpstream).pointee.peerEnded = true
                }
                return
            }
            switch s.pointee.state {
            case .sending: s.pointee.move(to: .flushingBeforeEOF)
            case .receiving: endDirection(slot, record, toUpstream: toUpstream)
            default: break
            }
        } else if retryReceive(slot, record, s, toUpstream: toUpstream, large: large, completion, ready: ready) {
            return
        } else if result < 0 {
            if atUpstream, state == handshaking { upstreamHandshakeFailed(record) }
            close(slot, reason: Worker.reason(result))
        } else if !completion.hasMore, ready {
            armReceive(slot, record, toUpstream: toUpstream)
        }
    }

    /// `length` bytes of ciphertext in `buffer`: into OpenSSL's input (lent in place when it
    /// can be), then on with the handshake or the relay.
    @inline(__always)
    func ciphertextArrived(
        _ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, _ s: UnsafeMutablePointer<Connection.Stream>,
        buffer: UInt16, length result: Int32, large: Bool, atUpstream: Bool
    ) {
        let state = record.pointee.state
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let address = bufferAddress(buffer, large: large)
        // In place only when OpenSSL holds no plaintext: then what it reads before this
        // buffer's own records is at most one partial record (the headroom's bound).
        let lent = large && state == .proxying && s.pointee.state == .receiving && SSL_pending(t.pointee.ssl) == 0
            && COpenSSL_input_lend(t.pointee.inputState, address, Int(result)) == 1
        if !lent {
            guard COpenSSL_input_append(t.pointee.inputState, address, Int(result)) == 1 else {
                recycle(buffer, large: large)
                close(slot, reason: .error)
                return
            }
            if large, !t.pointee.inputReleaseQueued {
                // The BIO grew by a megabyte: given back once it is read (at a tick).
                t.pointee.inputReleaseQueued = true
                buffers.inputReleasesAtTick.append((slot: slot, generation: record.pointee.generation, atUpstream: atUpstream))
            }
        }
        if state == .proxying { noteReceiveSize(s, result, large: large) }
        if state == (atUpstream ? .upstreamHandshaking : .handshaking) {
            recycle(buffer, large: large)
            if !t.pointee.closeAfterFlush { continueHandshake(slot, record, atUpstream: atUpstream) }
        } else if state == .proxying, s.pointee.state == .receiving {
            record.pointee.lastActivity = clock.tick
            afterPlaintextPull(slot, record, atUpstream: atUpstream, pullPlaintext(slot, record, atUpstream: atUpstream, into: buffer, large: large))
        } else {
            // Connecting, or the other side busy: the bytes wait in the BIO, and the
            // receive is armed again only once they are read.
            recycle(buffer, large: large)
        }
    }

    enum PlaintextPull: Equatable { case bytes(Int32), drained, closedByPeer, failed }

    /// Reads plaintext from a TLS side into `buffer` (its ciphertext is in the BIO, or lent
    /// to it from this buffer) and counts it. A small buffer takes one record; a large one,
    /// from its headroom on, as many as it holds (one big send instead of many).
    func readPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool, into buffer: UInt16, large: Bool) -> PlaintextPull {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let ssl = t.pointee.ssl
        if !t.pointee.readEnded, COpenSSL_input_pending(t.pointee.inputState) == 0, SSL_has_pending(ssl) == 0,
           SSL_get_shutdown(ssl) & SSL_RECEIVED_SHUTDOWN == 0 {
            // No ciphertext, none buffered and nothing ended: SSL_read could only say
            // WANT_READ (the read after each request's plaintext is sent).
            return .drained
        }
        let address = plaintextAddress(buffer, large: large)
        var count = SSL_read(ssl, address, Int32(buffers.small.bufferSize))
        if large, count > 0 {
            let capacity = Int32(buffers.large.bufferSize + Worker.plaintextHeadroom)
            while capacity - count >= 16_384 {
                let more = SSL_read(ssl, address + Int(count), capacity - count)
                guard more > 0 else {
                    // WANT_READ, or an error or close_notify the next read reports again.
                    if SSL_get_error(ssl, more) != SSL_ERROR_WANT_READ { t.pointee.readEnded = true }
                    ERR_clear_error()
                    break
                }
                count += more
            }
        }
        // Reading may write too (alerts, a key update's answer).
        flushCiphertext(slot, record, atUpstream: atUpstream)
        if count > 0 {
            // Listener and endpoint bytes are the application's (plaintext), as for TCP.
            countRelayed(slot, record, toUpstream: !atUpstream, count)
            return .bytes(count)
        }
        // Drained, nothing is lent; after close_notify or an error, what is left goes too:
        // every caller gives the buffer back now.
        COpenSSL_input_forget(t.pointee.inputState)
        switch SSL_get_error(ssl, count) {
        case SSL_ERROR_WANT_READ: return .drained
        case SSL_ERROR_ZERO_RETURN: return .closedByPeer
        default:
            ERR_clear_error()
            stats.add(.tlsErrors, listener: Int(record.pointee.listener))
            return .failed
        }
    }

    /// Reads plaintext into `buffer` and passes it on to the other side (a plain send, or
    /// encryption); or recycles the buffer when OpenSSL has none.
    func pullPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool, into buffer: UInt16, large: Bool) -> PlaintextPull {
        let pull = readPlaintext(slot, record, atUpstream: atUpstream, into: buffer, large: large)
        guard case .bytes(let count) = pull else {
            recycle(buffer, large: large)
            return pull
        }
        let toUpstream = !atUpstream
        let s = stream(record, toUpstream: toUpstream)
        if s.pointee.state == .receiving { s.pointee.move(to: .sending) }
        if isTLS(record, atUpstream: toUpstream) {
            s.pointee.hold(buffer, length: count, large: large, at: clock.tick)
            encryptFor(slot, record, atUpstream: toUpstream)
        } else {
            startSend(slot, record, toUpstream: toUpstream, buffer: buffer, length: count, large: large)
        }
        return pull
    }

    /// A memory BIO keeps the largest size it ever held: one that copied a large receive
    /// is freed at the first tick that finds it read, so an idle connection does not hold
    /// a megabyte for longer than a tick.
    func releaseIdleInputMemory() {
        let queued = buffers.inputReleasesAtTick
        buffers.inputReleasesAtTick.removeAll(keepingCapacity: true)
        for (slot, generation, atUpstream) in queued {
            let record = slab[slot]
            guard stillOpen(record, generation: generation), isTLS(record, atUpstream: atUpstream) else { continue }
            let t = tlsSlot(slot, atUpstream: atUpstream)
            guard t.pointee.inputReleaseQueued, let input = t.pointee.inputState else { continue }
            if COpenSSL_input_release_kept(input) == 1 {
                t.pointee.inputReleaseQueued = false
            } else {
                buffers.inputReleasesAtTick.append((slot: slot, generation: generation, atUpstream: atUpstream))
            }
        }
    }

    /// Where plaintext read from TLS into `buffer` starts: a large buffer's headroom.
    @inline(__always)
    func plaintextAddress(_ buffer: UInt16, large: Bool) -> UnsafeMutableRawPointer {
        large ? buffers.large.address(of: buffer) - Worker.plaintextHeadroom : buffers.small.address(of: buffer)
    }

    /// Where the bytes direction `s` holds start: its buffer, or for plaintext from a TLS
    /// side, `plaintextAddress`.
    @inline(__always)
    func heldBytes(_ record: UnsafeMutablePointer<Connection>, _ s: UnsafeMutablePointer<Connection.Stream>,
                   toUpstream: Bool) -> UnsafeMutableRawPointer {
        isTLS(record, atUpstream: !toUpstream)
            ? plaintextAddress(s.pointee.buffer, large: s.pointee.large) : bufferAddress(s.pointee.buffer, large: s.pointee.large)
    }

    /// What follows a pull from a TLS side, in any state of the direction it feeds.
    func afterPlaintextPull(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool, _ pull: PlaintextPull) {
        let toUpstream = !atUpstream
        let s = stream(record, toUpstream: toUpstream)
        switch pull {
        case .bytes:
            return
        case .drained:
            if s.pointee.state == .flushingBeforeEOF {
                endDirection(slot, record, toUpstream: toUpstream)
            } else if !s.pointee.receiveArmed {
                armReceive(slot, record, toUpstream: toUpstream)
            } else if s.pointee.state != .receiving {
                s.pointee.move(to: .receiving)
            }
        case .closedByPeer:
            // close_notify: the peer's EOF.
            endDirection(slot, record, toUpstream: toUpstream)
        case .failed:
            close(slot, reason: .error)
        }
    }

    /// The direction's EOF, once nothing is held: a half-close, after close_notify when
    /// its destination is TLS.
    func endDirection(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        guard isTLS(record, atUpstream: toUpstream) else {
            if s.pointee.state == .sending { s.pointee.move(to: .flushingBeforeEOF) }
            forwardEOF(slot, record, toUpstream: toUpstream)
            return
        }
        if s.pointee.state == .receiving { s.pointee.buffer = Connection.Stream.noBuffer }
        s.pointee.move(to: .flushingBeforeEOF)
        encryptFor(slot, record, atUpstream: toUpstream)
    }

    /// A plaintext send from a TLS side completed in full: read more into the same buffer
    /// before giving it back.
    func plaintextSent(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) {
        let s = stream(record, toUpstream: toUpstream)
        let atUpstream = !toUpstream
        afterPlaintextPull(slot, record, atUpstream: atUpstream,
                           pullPlaintext(slot, record, atUpstream: atUpstream, into: s.pointee.buffer, large: s.pointee.large))
    }

    /// The direction from a TLS side holds nothing and OpenSSL may hold plaintext (or
    /// ciphertext for it) already — it came with the handshake, or while the other side
    /// was being connected: read it into a buffer taken for it (at the tick if none is
    /// free, never dropping it), then carry on as after any pull.
    func pullPendingPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let toUpstream = !atUpstream
        let s = stream(record, toUpstream: toUpstream)
        guard s.pointee.state == .receiving || s.pointee.state == .waitingForBuffer else { return }
        let pending = COpenSSL_input_pending(t.pointee.inputState) > 0 || SSL_has_pending(t.pointee.ssl) == 1
        var buffer = Connection.Stream.noBuffer
        if pending {
            guard let taken = buffers.small.take() else {
                buffers.retriesAtTick.append((slot: slot, generation: record.pointee.generation))
                return
            }
            buffer = taken
        }
        if s.pointee.state == .waitingForBuffer {
            // Still waiting with nothing to do: it re-arms when buffers return.
            guard pending || t.pointee.peerEnded else { return }
            buffers.waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: toUpstream))
            s.pointee.move(to: .receiving)
        }
        if pending {
            let pull = pullPlaintext(slot, record, atUpstream: atUpstream, into: buffer, large: false)
            if t.pointee.peerEnded, case .bytes = pull {
                // The rest follows as each send completes; then the EOF.
                if s.pointee.state == .sending { s.pointee.move(to: .flushingBeforeEOF) }
                return
            }
            if t.pointee.peerEnded, pull == .drained {
                endDirection(slot, record, toUpstream: toUpstream)
                return
            }
            afterPlaintextPull(slot, record, atUpstream: atUpstream, pull)
        } else if t.pointee.peerEnded {
            endDirection(slot, record, toUpstream: toUpstream)
        } else if !s.pointee.receiveArmed, s.pointee.state == .receiving {
            armReceive(slot, record, toUpstream: toUpstream)
        }
    }

    // MARK: Close

    /// Gives back what a closing TLS connection holds outside requests in flight.
    func releaseTLSBuffers(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        if record.pointee.tls { releaseTLSBuffers(slot, record, atUpstream: false) }
        if record.pointee.upstreamTLS { releaseTLSBuffers(slot, record, atUpstream: true) }
    }

    private func releaseTLSBuffers(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        // A buffer lent to OpenSSL goes back below or when its send ends: never read again.
        if let input = t.pointee.inputState { COpenSSL_input_forget(input) }
        if t.pointee.cipherUnsent {
            // Filled, never sent: in no request.
            recycle(t.pointee.cipherBuffer, large: false)
            t.pointee.cipherBuffer = Connection.Stream.noBuffer
            t.pointee.cipherUnsent = false
        }
        let s = stream(record, toUpstream: atUpstream)
        // Plaintext held for encryption is in no request.
        if s.pointee.isSending, s.pointee.buffer != Connection.Stream.noBuffer {
            recycle(s.pointee.buffer, large: s.pointee.large)
            s.pointee.buffer = Connection.Stream.noBuffer
        }
    }

    func freeTLS(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        if record.pointee.tls {
            let t = side.tls + Int(slot)
            SSL_free(t.pointee.ssl)
            if t.pointee.headerBuffer != Connection.Stream.noBuffer { recycle(t.pointee.headerBuffer, large: false) }
            t.pointee = TLSSlot()
        }
        if record.pointee.upstreamTLS {
            let t = side.upstreamTLS + Int(slot)
            SSL_free(t.pointee.ssl)
            t.pointee = TLSSlot()
        }
    }
}

/// The methods of every TLS input and output BIO (`input_bio.h`, `output_bio.h`), made
/// once for the process. Nil only when OpenSSL was out of memory then, and every TLS
/// connection fails to open. OpenSSL never changes a method once BIOs use it, so the
/// workers share them.
nonisolated(unsafe) let inputBIOMethod: OpaquePointer? = COpenSSL_input_method_new()
nonisolated(unsafe) let outputBIOMethod: OpaquePointer? = COpenSSL_output_method_new()

extension TLSSlot {
    /// Ciphertext OpenSSL has written that is not yet in a send buffer.
    @inline(__always)
    var ciphertextPending: Int { COpenSSL_bytes_pending(outputQueue.unsafelyUnwrapped) }
}
