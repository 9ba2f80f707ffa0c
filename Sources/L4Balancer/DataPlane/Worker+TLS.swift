internal import COpenSSL
import URing

#if canImport(Glibc)
import Glibc
#endif

/// One TLS connection's OpenSSL state, in the worker's side table by slot (touched only by
/// TLS connections). Ciphertext from the client is copied into `input` (a memory BIO)
/// and the receive buffer is reused for the plaintext OpenSSL reads out of it; ciphertext
/// OpenSSL writes to `output` goes to the client in one small buffer at a time.
struct TLSSlot {
    var ssl: OpaquePointer?
    var input: OpaquePointer?
    var output: OpaquePointer?
    /// The small buffer carrying ciphertext to the client (a send in flight), or none.
    var cipherBuffer = Connection.Stream.noBuffer
    var cipherLength: Int32 = 0
    var cipherSent: Int32 = 0
    /// The small buffer the PROXY v2 header (with its TLS TLVs) is sent from.
    var headerBuffer = Connection.Stream.noBuffer
    /// close_notify has been written (after the upstream's EOF).
    var closeNotifyQueued = false
    /// The handshake failed: close once its alert has been sent.
    var closeAfterFlush = false
    /// The client's FIN came while the upstream was still being connected.
    var clientEnded = false
    /// `cipherBuffer` is filled but its send could not be queued: retried at the tick.
    var cipherUnsent = false
    /// Accept time (monotonic ms), for the handshake latency.
    var started: Int64 = 0
}

/// TLS termination inside the worker (DESIGN §3): the same relay and buffer contract as
/// plain TCP, with OpenSSL between the client socket and the buffers.
///
/// - client → upstream: a receive brings ciphertext; it is copied into the connection's
///   input BIO and the same buffer takes the plaintext `SSL_read` gives, which is sent to
///   the upstream. When that send completes, more plaintext is read into the same buffer
///   before the buffer is recycled; the receive is armed again only when OpenSSL has no
///   whole record left (`SSL_ERROR_WANT_READ`), so the BIO holds at most one partial
///   record plus one receive's worth.
/// - upstream → client: plaintext arrives as for plain TCP (`Connection.Stream`); it is
///   encrypted into the output BIO while that holds less than `outputHighWater`, and the
///   ciphertext goes to the client from one small buffer at a time. The plaintext buffer
///   is recycled (and the upstream read again) once OpenSSL has taken all of it.
/// - The handshake runs before the upstream is connected; `handshake_timeout` bounds it.
///   The upstream's EOF becomes close_notify, then a half-close once it is sent.
extension Worker {
    /// Ciphertext waiting for the client beyond which plaintext is not encrypted (two
    /// full records): the upstream direction waits, as a plain send would.
    static let outputHighWater = 2 * (16_384 + 64)

    // MARK: Handshake

    func startHandshake(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, context: TLSServerContext) {
        let t = tlsSlots + Int(slot)
        guard let ssl = SSL_new(context.defaultContext) else {
            close(slot, reason: .error)
            return
        }
        let input = BIO_new(BIO_s_mem())
        let output = BIO_new(BIO_s_mem())
        guard let input, let output else {
            if let input { BIO_free(input) }
            if let output { BIO_free(output) }
            SSL_free(ssl)
            close(slot, reason: .error)
            return
        }
        // An empty memory BIO means "wait for more", not EOF.
        COpenSSL_BIO_set_mem_eof_return(input, -1)
        COpenSSL_BIO_set_mem_eof_return(output, -1)
        SSL_set_bio(ssl, input, output)
        SSL_set_accept_state(ssl)
        t.initialize(to: TLSSlot(ssl: ssl, input: input, output: output, started: nowMilliseconds))
        record.pointee.tls = true
        record.pointee.state = .handshaking
        armReceive(slot, record, toUpstream: true)
    }

    func continueHandshake(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let ssl = t.pointee.ssl
        let result = SSL_do_handshake(ssl)
        if result == 1 {
            flushCiphertext(slot, record)
            handshakeDone(slot, record)
            return
        }
        let error = SSL_get_error(ssl, result)
        if error == SSL_ERROR_WANT_READ {
            flushCiphertext(slot, record)
            if !record.pointee.toUpstream.receiveArmed { armReceive(slot, record, toUpstream: true) }
            return
        }
        handshakeFailed(slot, record)
    }

    @inline(never)
    func handshakeFailed(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let listener = Int(record.pointee.listener)
        stats.add(.tlsHandshakeFailures, listener: listener)
        switch COpenSSL_client_auth_failure(t.pointee.ssl) {
        case 1: stats.add(.tlsClientNoCertificate, listener: listener)
        case 2: stats.add(.tlsClientUntrusted, listener: listener)
        case 3: stats.add(.tlsClientRevoked, listener: listener)
        case 4: stats.add(.tlsClientExpired, listener: listener)
        default: break
        }
        ERR_clear_error()
        // Send the alert OpenSSL wrote, then close (the handshake timeout still applies).
        t.pointee.closeAfterFlush = true
        flushCiphertext(slot, record)
        if t.pointee.cipherBuffer == Connection.Stream.noBuffer { close(slot, reason: .error) }
    }

    func handshakeDone(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let ssl = t.pointee.ssl
        let listener = Int(record.pointee.listener)
        switch SSL_version(ssl) {
        case TLS1_3_VERSION: stats.add(.tlsHandshakes13, listener: listener)
        case TLS1_2_VERSION: stats.add(.tlsHandshakes12, listener: listener)
        default: stats.add(.tlsHandshakesOther, listener: listener)
        }
        if SSL_session_reused(ssl) == 1 { stats.add(.tlsResumed, listener: listener) }
        stats.add(.tlsHandshakeMilliseconds, listener: listener, UInt64(max(0, nowMilliseconds - t.pointee.started)))
        record.pointee.lastActivity = nowTick
        record.pointee.state = .connecting
        startConnect(slot)
    }

    // MARK: Client → upstream

    /// A receive on a TLS client socket: ciphertext for OpenSSL. Small buffers, multishot;
    /// once a read fills one (bulk), large buffers, single-shot, as for plain TCP.
    func receivedCiphertext(_ completion: Completion, _ userData: UserData, large: Bool) {
        guard let (record, s) = beginReceive(completion, userData, toUpstream: true, large: large, duringOpening: true) else { return }
        let slot = userData.slot
        let buffer = completion.bufferID
        let more = completion.hasMore
        let state = record.pointee.state
        let result = completion.result
        let t = tlsSlots + Int(slot)
        if result > 0, let buffer {
            guard BIO_write(t.pointee.input, bufferAddress(buffer, large: large), result) == result else {
                recycle(buffer, large: large)
                close(slot, reason: .error)
                return
            }
            if state == .proxying {
                if !large, Int(result) == smallBuffers.bufferSize {
                    s.pointee.prefersLarge = true
                } else if large, Int(result) < smallBuffers.bufferSize {
                    s.pointee.prefersLarge = false
                }
            }
            if state == .handshaking {
                recycle(buffer, large: large)
                if !t.pointee.closeAfterFlush { continueHandshake(slot, record) }
            } else if state == .proxying, s.pointee.state == .receiving {
                record.pointee.lastActivity = nowTick
                afterPlaintextPull(slot, record, pullPlaintext(slot, record, into: buffer, large: large))
            } else {
                // Connecting, or a plaintext send in flight: the bytes wait in the BIO,
                // and the receive is armed again only once they are read.
                recycle(buffer, large: large)
            }
            return
        }
        if let buffer { recycle(buffer, large: large) }
        if result == 0 {
            guard state == .proxying else {
                if state == .handshaking { close(slot, reason: .clientFIN) } else { t.pointee.clientEnded = true }
                return
            }
            switch s.pointee.state {
            case .sending: s.pointee.move(to: .flushingBeforeEOF)
            case .receiving: forwardEOF(slot, record, toUpstream: true)
            default: break
            }
        } else if result == -ENOBUFS, large {
            // Large buffers are few: fall back to small ones rather than wait.
            s.pointee.prefersLarge = false
            if state == .proxying, s.pointee.state == .receiving { armReceive(slot, record, toUpstream: true) }
        } else if result == -ENOBUFS {
            stats.add(.bufferWaits, listener: Int(record.pointee.listener))
            if state == .handshaking || (state == .proxying && s.pointee.state == .receiving) {
                waitForBuffer(slot, record, toUpstream: true)
            }
        } else if result == -ECANCELED, !more {
            if state == .handshaking || (state == .proxying && s.pointee.state == .receiving) {
                armReceive(slot, record, toUpstream: true)
            }
        } else if result < 0 {
            close(slot, reason: Worker.reason(result))
        } else if !more, state == .handshaking || (state == .proxying && s.pointee.state == .receiving) {
            armReceive(slot, record, toUpstream: true)
        }
    }

    enum PlaintextPull { case sent, drained, closedByPeer, failed }

    /// Reads plaintext into `buffer` (free: its ciphertext is in the BIO) and sends it to
    /// the upstream; or recycles it when OpenSSL has none. A small buffer takes one
    /// record; a large one as many as it holds (one big send instead of many).
    func pullPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, into buffer: UInt16, large: Bool) -> PlaintextPull {
        let t = tlsSlots + Int(slot)
        let ssl = t.pointee.ssl
        let address = bufferAddress(buffer, large: large)
        var count = SSL_read(ssl, address, Int32(smallBuffers.bufferSize))
        if large, count > 0 {
            let capacity = Int32(largeBuffers.bufferSize)
            while capacity - count >= 16_384 {
                let more = SSL_read(ssl, address + Int(count), capacity - count)
                guard more > 0 else {
                    // WANT_READ, or an error or close_notify the next pull reports again.
                    ERR_clear_error()
                    break
                }
                count += more
            }
            if COpenSSL_BIO_pending(t.pointee.input) == 0, SSL_has_pending(ssl) == 0 { releaseInputMemory(t) }
        }
        // Reading may write too (alerts, a key update's answer).
        flushCiphertext(slot, record)
        if count > 0 {
            let s = stream(record, toUpstream: true)
            let endpoint = Int(record.pointee.endpoint)
            // Listener and endpoint bytes are the application's (plaintext), as for TCP.
            stats.add(.bytesIn, listener: Int(record.pointee.listener), UInt64(count))
            stats.add(.bytesOut, endpoint: endpoint, UInt64(count))
            if let slots = accessSlots { slots[Int(slot)].bytesFromClient &+= UInt64(count) }
            if s.pointee.state == .receiving { s.pointee.move(to: .sending) }
            startSend(slot, record, toUpstream: true, buffer: buffer, length: count, large: large)
            return .sent
        }
        recycle(buffer, large: large)
        switch SSL_get_error(ssl, count) {
        case SSL_ERROR_WANT_READ: return .drained
        case SSL_ERROR_ZERO_RETURN: return .closedByPeer
        default:
            ERR_clear_error()
            stats.add(.tlsErrors, listener: Int(record.pointee.listener))
            return .failed
        }
    }

    /// A memory BIO keeps the largest size it ever held: after a large receive's burst,
    /// an empty input BIO is replaced by a fresh one, so an idle connection does not hold
    /// a megabyte.
    func releaseInputMemory(_ t: UnsafeMutablePointer<TLSSlot>) {
        guard let fresh = BIO_new(BIO_s_mem()) else { return }
        COpenSSL_BIO_set_mem_eof_return(fresh, -1)
        SSL_set0_rbio(t.pointee.ssl, fresh)  // frees the old one
        t.pointee.input = fresh
    }

    /// What follows a pull, in any state of the client → upstream direction.
    func afterPlaintextPull(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, _ pull: PlaintextPull) {
        let s = stream(record, toUpstream: true)
        switch pull {
        case .sent:
            return
        case .drained:
            if s.pointee.state == .flushingBeforeEOF {
                forwardEOF(slot, record, toUpstream: true)
            } else if !s.pointee.receiveArmed {
                armReceive(slot, record, toUpstream: true)
            } else if s.pointee.state != .receiving {
                s.pointee.move(to: .receiving)
            }
        case .closedByPeer:
            // close_notify: the client's EOF.
            if s.pointee.state == .sending { s.pointee.move(to: .flushingBeforeEOF) }
            forwardEOF(slot, record, toUpstream: true)
        case .failed:
            close(slot, reason: .error)
        }
    }

    /// A plaintext send to the upstream completed in full: read more into the same buffer
    /// before giving it back.
    func plaintextSentUpstream(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let s = stream(record, toUpstream: true)
        afterPlaintextPull(slot, record, pullPlaintext(slot, record, into: s.pointee.buffer, large: s.pointee.large))
    }

    /// Proxying starts after the upstream connected: plaintext that arrived meanwhile (or
    /// with the client's Finished) is read at once, into a buffer taken for it.
    func startTLSProxying(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        armReceive(slot, record, toUpstream: false)
        pullPendingPlaintext(slot, record)
    }

    /// The client → upstream direction holds nothing and OpenSSL may hold plaintext (or
    /// ciphertext for it) already: read it into a buffer taken for it — at the tick if
    /// none is free, never dropping it — then carry on as after any pull.
    func pullPendingPlaintext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let s = stream(record, toUpstream: true)
        guard s.pointee.state == .receiving || s.pointee.state == .waitingForBuffer else { return }
        if COpenSSL_BIO_pending(t.pointee.input) > 0 || SSL_has_pending(t.pointee.ssl) == 1 {
            guard let buffer = smallBuffers.take() else {
                retriesAtTick.append((slot: slot, generation: record.pointee.generation))
                return
            }
            if s.pointee.state == .waitingForBuffer {
                waiters.remove(BufferWaitQueue.entry(slot: slot, toUpstream: true))
                s.pointee.move(to: .receiving)
            }
            let pull = pullPlaintext(slot, record, into: buffer, large: false)
            if t.pointee.clientEnded, pull == .sent {
                s.pointee.move(to: .flushingBeforeEOF)
                return
            }
            if t.pointee.clientEnded, pull == .drained {
                forwardEOF(slot, record, toUpstream: true)
                return
            }
            afterPlaintextPull(slot, record, pull)
        } else if t.pointee.clientEnded {
            forwardEOF(slot, record, toUpstream: true)
        } else if !s.pointee.receiveArmed, s.pointee.state == .receiving {
            armReceive(slot, record, toUpstream: true)
        }
    }

    // MARK: Upstream → client

    /// Plaintext from the upstream (`received`): held as the direction's buffer, then
    /// encrypted as the output BIO has room.
    func receivedPlaintextForClient(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, buffer: UInt16, length: Int32, large: Bool) {
        let s = stream(record, toUpstream: false)
        if s.pointee.state == .sending {
            absorb(slot, buffer, length: length, into: s)
        } else {
            s.pointee.move(to: .sending)
            s.pointee.buffer = buffer
            s.pointee.large = large
            s.pointee.length = length
            s.pointee.sent = 0
            s.pointee.sendProgress = nowTick
        }
        if record.pointee.state == .proxying { encryptForClient(slot, record) }
    }

    /// The upstream's EOF: close_notify after what came before it.
    func upstreamEndedTLS(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let s = stream(record, toUpstream: false)
        if s.pointee.state == .receiving { s.pointee.buffer = Connection.Stream.noBuffer }
        s.pointee.move(to: .flushingBeforeEOF)
        encryptForClient(slot, record)
    }

    /// Encrypts held plaintext while the output BIO is below its high water, recycles a
    /// plaintext buffer once OpenSSL has all of it, and sends the ciphertext.
    func encryptForClient(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let ssl = t.pointee.ssl
        let s = stream(record, toUpstream: false)
        while s.pointee.isSending, s.pointee.buffer != Connection.Stream.noBuffer,
              COpenSSL_BIO_pending(t.pointee.output) < Worker.outputHighWater {
            let left = s.pointee.length - s.pointee.sent
            if left > 0 {
                let address = bufferAddress(s.pointee.buffer, large: s.pointee.large) + Int(s.pointee.sent)
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
                    armReceive(slot, record, toUpstream: false)
                } else {
                    s.pointee.move(to: .receiving)
                }
            }
        }
        if s.pointee.state == .flushingBeforeEOF, s.pointee.buffer == Connection.Stream.noBuffer, !t.pointee.closeNotifyQueued {
            t.pointee.closeNotifyQueued = true
            SSL_shutdown(ssl)
            ERR_clear_error()
        }
        flushCiphertext(slot, record)
        if t.pointee.closeNotifyQueued, s.pointee.state == .flushingBeforeEOF,
           t.pointee.cipherBuffer == Connection.Stream.noBuffer, COpenSSL_BIO_pending(t.pointee.output) == 0 {
            forwardEOF(slot, record, toUpstream: false)
        }
    }

    // MARK: Ciphertext to the client

    /// Starts sending what the output BIO holds, if no ciphertext send is in flight.
    func flushCiphertext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        guard t.pointee.cipherBuffer == Connection.Stream.noBuffer else { return }
        let pending = COpenSSL_BIO_pending(t.pointee.output)
        guard pending > 0 else { return }
        if record.pointee.toClient.state == .finished {
            // The client's side is shut for writing (close_notify went before): what
            // OpenSSL writes now (an alert, a KeyUpdate answer) has nowhere to go.
            _ = BIO_ctrl(t.pointee.output, BIO_CTRL_RESET, 0, nil)
            return
        }
        guard let buffer = smallBuffers.take() else {
            // Every small buffer is out: try again on the next tick.
            retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        let count = BIO_read(t.pointee.output, bufferAddress(buffer, large: false), Int32(min(pending, smallBuffers.bufferSize)))
        guard count > 0 else {
            recycle(buffer, large: false)
            return
        }
        t.pointee.cipherBuffer = buffer
        t.pointee.cipherLength = count
        t.pointee.cipherSent = 0
        sendCiphertext(slot, record)
    }

    func sendCiphertext(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        let sent = Int(t.pointee.cipherSent)
        guard ring.prepareSend(
            socket: record.pointee.client, bytes: bufferAddress(t.pointee.cipherBuffer, large: false) + sent,
            length: Int(t.pointee.cipherLength) - sent,
            userData: UserData(.sendCiphertextToClient, slot: slot, generation: record.pointee.generation).raw)
        else {
            // Never close from here: callers go on using the connection. The buffer stays
            // held (so no second send starts) and the send is tried again at the tick.
            stats.add(.submissionDrops)
            t.pointee.cipherUnsent = true
            retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        t.pointee.cipherUnsent = false
        record.pointee.inFlight += 1
    }

    func ciphertextSent(_ completion: Completion, _ userData: UserData) {
        let slot = userData.slot
        let record = slab[slot]
        guard record.pointee.generation == userData.generation else { return }
        record.pointee.inFlight -= 1
        let t = tlsSlots + Int(slot)
        let state = record.pointee.state
        guard state != .closing, completion.result > 0 else {
            recycle(t.pointee.cipherBuffer, large: false)
            t.pointee.cipherBuffer = Connection.Stream.noBuffer
            if state == .closing { finishClosing(slot) } else { close(slot, reason: Worker.reason(completion.result)) }
            return
        }
        t.pointee.cipherSent += completion.result
        record.pointee.toClient.sendProgress = nowTick
        if state == .proxying { record.pointee.lastActivity = nowTick }
        if t.pointee.cipherSent < t.pointee.cipherLength {
            sendCiphertext(slot, record)
            return
        }
        recycle(t.pointee.cipherBuffer, large: false)
        t.pointee.cipherBuffer = Connection.Stream.noBuffer
        if state == .proxying {
            encryptForClient(slot, record)
        } else {
            flushCiphertext(slot, record)
            if t.pointee.closeAfterFlush, t.pointee.cipherBuffer == Connection.Stream.noBuffer { close(slot, reason: .error) }
        }
    }

    // MARK: PROXY v2 with TLS

    /// Writes and sends the PROXY v2 header, or tries again at the tick when no buffer is
    /// free (the connection waits in `.sendingProxyHeader`, nothing in flight).
    func startTLSProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        guard let length = writeTLSProxyHeader(slot, record) else {
            retriesAtTick.append((slot: slot, generation: record.pointee.generation))
            return
        }
        record.pointee.toUpstream.length = length
        record.pointee.toUpstream.sent = 0
        sendProxyHeader(slot, record)
    }

    /// Writes the PROXY v2 header with the TLS TLVs (ALPN, SNI as authority, and the SSL
    /// TLV: version, cipher and, under mTLS, the verified client's common name) into a
    /// small buffer taken for it; returns its length, or nil when no buffer is free.
    func writeTLSProxyHeader(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) -> Int32? {
        let t = tlsSlots + Int(slot)
        guard let buffer = smallBuffers.take() else { return nil }
        t.pointee.headerBuffer = buffer
        let out = bufferAddress(buffer, large: false)
        var length = ProxyProtocolHeader.write(version: .v2, client: record.pointee.client, into: out)
        // A LOCAL header (addresses unknown) carries no TLVs.
        guard length > 16 else { return Int32(length) }
        let ssl = t.pointee.ssl
        func tlv(_ type: UInt8, _ bytes: UnsafeRawPointer?, _ count: Int) {
            guard let bytes, count > 0, count <= 1024 else { return }
            out.storeBytes(of: type, toByteOffset: length, as: UInt8.self)
            out.storeBytes(of: UInt16(count).bigEndian, toByteOffset: length + 1, as: UInt16.self)
            (out + length + 3).copyMemory(from: bytes, byteCount: count)
            length += 3 + count
        }
        var alpn: UnsafePointer<UInt8>?
        var alpnLength: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &alpn, &alpnLength)
        tlv(0x01, alpn, Int(alpnLength))  // PP2_TYPE_ALPN
        if let name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name) {
            tlv(0x02, name, strlen(name))  // PP2_TYPE_AUTHORITY
        }
        // PP2_TYPE_SSL: client flags, verify result, then sub-TLVs.
        let sslStart = length
        out.storeBytes(of: UInt8(0x20), toByteOffset: length, as: UInt8.self)
        length += 3
        let hasCertificate = COpenSSL_has_peer_certificate(ssl) == 1
        let verified = hasCertificate && SSL_get_verify_result(ssl) == X509_V_OK
        // PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS when a certificate came.
        out.storeBytes(of: UInt8(hasCertificate ? 0x07 : 0x01), toByteOffset: length, as: UInt8.self)
        out.storeBytes(of: UInt32(verified || !hasCertificate ? 0 : 1).bigEndian, toByteOffset: length + 1, as: UInt32.self)
        length += 5
        if let version = SSL_get_version(ssl) { tlv(0x21, version, strlen(version)) }  // PP2_SUBTYPE_SSL_VERSION
        if let cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(ssl)) { tlv(0x23, cipher, strlen(cipher)) }  // PP2_SUBTYPE_SSL_CIPHER
        if verified {
            var name = [CChar](repeating: 0, count: 256)
            let count = COpenSSL_peer_common_name(ssl, &name, Int32(name.count))
            name.withUnsafeBytes { tlv(0x22, $0.baseAddress, Int(count)) }  // PP2_SUBTYPE_SSL_CN
        }
        out.storeBytes(of: UInt16(length - sslStart - 3).bigEndian, toByteOffset: sslStart + 1, as: UInt16.self)
        out.storeBytes(of: UInt16(length - 16).bigEndian, toByteOffset: 14, as: UInt16.self)
        return Int32(length)
    }

    // MARK: Close

    /// Gives back what a closing TLS connection holds outside requests in flight.
    func releaseTLSBuffers(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = tlsSlots + Int(slot)
        if t.pointee.cipherUnsent {
            // Filled, never sent: in no request.
            recycle(t.pointee.cipherBuffer, large: false)
            t.pointee.cipherBuffer = Connection.Stream.noBuffer
            t.pointee.cipherUnsent = false
        }
        let s = stream(record, toUpstream: false)
        // Plaintext held for encryption is in no request.
        if s.pointee.isSending, s.pointee.buffer != Connection.Stream.noBuffer {
            recycle(s.pointee.buffer, large: s.pointee.large)
            s.pointee.buffer = Connection.Stream.noBuffer
        }
    }

    func freeTLS(_ slot: UInt32) {
        let t = tlsSlots + Int(slot)
        SSL_free(t.pointee.ssl)
        if t.pointee.headerBuffer != Connection.Stream.noBuffer { recycle(t.pointee.headerBuffer, large: false) }
        t.pointee = TLSSlot()
    }
}
