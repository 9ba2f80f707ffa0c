internal import COpenSSL
import URing

#if canImport(Glibc)
import Glibc
#endif

/// TLS handshakes, with the client (termination) and with the upstream (`clusters[].tls`).
extension Worker {
    /// The client's handshake (l4lb the server).
    func startHandshake(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, context: TLSServerContext) {
        guard let ssl = SSL_new(context.defaultContext) else {
            close(slot, reason: .error)
            return
        }
        SSL_set_accept_state(ssl)
        guard attach(ssl, slot, atUpstream: false) else {
            close(slot, reason: .error)
            return
        }
        record.pointee.tls = true
        record.pointee.move(to: .handshaking)
        armReceive(slot, record, toUpstream: true)
    }

    /// The upstream's handshake (l4lb the client), once connected and the PROXY header sent.
    func startUpstreamHandshake(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, context: TLSClientContext) {
        guard let ssl = context.connection(endpoint: Int(record.pointee.endpoint), socket: record.pointee.upstream),
              attach(ssl, slot, atUpstream: true)
        else {
            stats.add(.tlsUpstreamFailures, listener: Int(record.pointee.listener))
            close(slot, reason: .error)
            return
        }
        record.pointee.upstreamTLS = true
        record.pointee.move(to: .upstreamHandshaking)
        record.pointee.lastActivity = clock.tick
        // Bounded by connect_timeout: filed again at that deadline.
        let limit = plans[record.pointee.plan].connectTicks[Int(record.pointee.listener)]
        if limit > 0 {
            wheel.remove(slot, in: slab)
            wheel.insert(slot, deadline: clock.tick &+ limit, in: slab)
        }
        continueHandshake(slot, record, atUpstream: true)
    }

    /// Gives `ssl` its BIOs and its side's slot; false (and `ssl` freed) on failure.
    func attach(_ ssl: OpaquePointer, _ slot: UInt32, atUpstream: Bool) -> Bool {
        let input = inputBIOMethod.flatMap { BIO_new($0) }
        let output = outputBIOMethod.flatMap { BIO_new($0) }
        guard let input, let output else {
            if let input { BIO_free(input) }
            if let output { BIO_free(output) }
            SSL_free(ssl)
            return false
        }
        SSL_set_bio(ssl, input, output)
        tlsSlot(slot, atUpstream: atUpstream).initialize(to: TLSSlot(
            ssl: ssl, input: input, output: output, inputState: COpenSSL_input_state(input),
            outputQueue: COpenSSL_output_queue(output), started: clock.milliseconds))
        return true
    }

    func continueHandshake(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let ssl = tlsSlot(slot, atUpstream: atUpstream).pointee.ssl
        let result = SSL_do_handshake(ssl)
        if result == 1 {
            flushCiphertext(slot, record, atUpstream: atUpstream)
            if atUpstream { upstreamHandshakeDone(slot, record) } else { handshakeDone(slot, record) }
            return
        }
        if SSL_get_error(ssl, result) == SSL_ERROR_WANT_READ {
            flushCiphertext(slot, record, atUpstream: atUpstream)
            if !stream(record, toUpstream: !atUpstream).pointee.receiveArmed { armReceive(slot, record, toUpstream: !atUpstream) }
            return
        }
        handshakeFailed(slot, record, atUpstream: atUpstream)
    }

    @inline(never)
    func handshakeFailed(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, atUpstream: Bool) {
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let listener = Int(record.pointee.listener)
        if atUpstream {
            if COpenSSL_verify_failure(t.pointee.ssl) != nil { stats.add(.tlsUpstreamUnverified, listener: listener) }
            upstreamHandshakeFailed(record)
        } else {
            stats.add(.tlsHandshakeFailures, listener: listener)
            switch COpenSSL_client_auth_failure(t.pointee.ssl) {
            case 1: stats.add(.tlsClientNoCertificate, listener: listener)
            case 2: stats.add(.tlsClientUntrusted, listener: listener)
            case 3: stats.add(.tlsClientRevoked, listener: listener)
            case 4: stats.add(.tlsClientExpired, listener: listener)
            default: break
            }
        }
        ERR_clear_error()
        // Send the alert OpenSSL wrote, then close (the opening timeout still applies).
        t.pointee.closeAfterFlush = true
        flushCiphertext(slot, record, atUpstream: atUpstream)
        if t.pointee.cipherBuffer == Connection.Stream.noBuffer { close(slot, reason: .error) }
    }

    func handshakeDone(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let t = side.tls + Int(slot)
        let ssl = t.pointee.ssl
        let listener = Int(record.pointee.listener)
        switch SSL_version(ssl) {
        case TLS1_3_VERSION: stats.add(.tlsHandshakes13, listener: listener)
        case TLS1_2_VERSION: stats.add(.tlsHandshakes12, listener: listener)
        default: stats.add(.tlsHandshakesOther, listener: listener)
        }
        if SSL_session_reused(ssl) == 1 { stats.add(.tlsResumed, listener: listener) }
        let milliseconds = max(0, clock.milliseconds - t.pointee.started)
        stats.add(.tlsHandshakeMilliseconds, listener: listener, UInt64(milliseconds))
        stats.add(WorkerStats.ListenerCounter.handshakeBucket(milliseconds: milliseconds), listener: listener)
        record.pointee.lastActivity = clock.tick
        record.pointee.move(to: .connecting)
        startConnect(slot)
    }

    /// The endpoint failed this connection's handshake: counted for it (outlier detection
    /// hears of it) and for the listener.
    @inline(never)
    func upstreamHandshakeFailed(_ record: UnsafeMutablePointer<Connection>) {
        stats.add(.tlsUpstreamFailures, listener: Int(record.pointee.listener))
        stats.add(.connectFailures, endpoint: Int(record.pointee.endpoint))
    }

    func upstreamHandshakeDone(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let listener = Int(record.pointee.listener)
        stats.add(.tlsUpstreamHandshakes, listener: listener)
        stats.add(.total, endpoint: Int(record.pointee.endpoint))
        if SSL_session_reused(side.upstreamTLS[Int(slot)].ssl) == 1 { stats.add(.tlsUpstreamResumed, listener: listener) }
        record.pointee.lastActivity = clock.tick
        startProxying(slot, record)
    }

    /// After the connect (and the PROXY header): the upstream handshake when the cluster
    /// has `tls:`, else the relay.
    func upstreamReady(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) {
        let plan = plans[record.pointee.plan]
        let cluster = Int(record.pointee.cluster)
        if let context = plan.upstreamTLS[cluster] {
            startUpstreamHandshake(slot, record, context: context)
        } else if plan.wantsUpstreamTLS[cluster] {
            // Its context failed to build: never plaintext to an endpoint meant for TLS.
            stats.add(.tlsUpstreamFailures, listener: Int(record.pointee.listener))
            close(slot, reason: .error)
        } else {
            startProxying(slot, record)
        }
    }
}
