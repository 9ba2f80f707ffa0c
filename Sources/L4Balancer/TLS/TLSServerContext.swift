internal import COpenSSL

#if canImport(Glibc)
import Glibc
#endif

/// One worker's OpenSSL contexts for one TLS listener: a context per certificate (SNI
/// picks among them in a C callback; the first is the default), all with the listener's
/// versions, ciphers, ALPN, client-certificate checks, a per-worker session cache, and
/// session tickets whose keys rotate every `ticketPeriod` and are derived from the
/// listener's secret, so every worker opens every other worker's tickets. Built by the
/// worker when it adopts a snapshot (its plan), freed with that plan.
final class TLSServerContext {
    static let ticketPeriodSeconds: Int64 = 3600
    let contexts: [OpaquePointer]
    /// The C table the callbacks read (`COpenSSL_ListenerTable`), and what it points at.
    let table: UnsafeMutablePointer<COpenSSL_ListenerTable>
    private let names: UnsafeMutablePointer<UnsafePointer<CChar>?>
    private let nameContexts: UnsafeMutablePointer<OpaquePointer?>
    private var nameStrings: [UnsafeMutablePointer<CChar>] = []
    private let alpnWire: UnsafeMutablePointer<UInt8>?
    let handshakeTimeoutMilliseconds: Int64

    init?(_ tls: Config.TLS, listenerName: String, ticketSecret: [UInt8]) {
        handshakeTimeoutMilliseconds = tls.handshakeTimeout.milliseconds
        var built: [OpaquePointer] = []
        for certificate in tls.certificates {
            guard let ctx = TLSServerContext.context(tls, certificate: certificate, listenerName: listenerName) else {
                for c in built { SSL_CTX_free(c) }
                return nil
            }
            built.append(ctx)
        }
        guard !built.isEmpty else { return nil }
        contexts = built
        let pairs = zip(tls.certificates, built).flatMap { certificate, ctx in certificate.names.map { ($0, ctx) } }
        names = .allocate(capacity: max(pairs.count, 1))
        nameContexts = .allocate(capacity: max(pairs.count, 1))
        for (i, (name, ctx)) in pairs.enumerated() {
            let copy = strdup(name)!
            nameStrings.append(copy)
            names[i] = UnsafePointer(copy)
            nameContexts[i] = ctx
        }
        var wire: [UInt8] = []
        for protocolName in tls.alpn {
            wire.append(UInt8(protocolName.utf8.count))
            wire.append(contentsOf: protocolName.utf8)
        }
        if wire.isEmpty {
            alpnWire = nil
        } else {
            alpnWire = .allocate(capacity: wire.count)
            alpnWire!.initialize(from: wire, count: wire.count)
        }
        table = .allocate(capacity: 1)
        table.initialize(to: COpenSSL_ListenerTable())
        table.pointee.count = Int32(pairs.count)
        table.pointee.names = names
        table.pointee.contexts = nameContexts
        table.pointee.alpn = UnsafePointer(alpnWire)
        table.pointee.alpn_length = UInt32(wire.count)
        withUnsafeMutableBytes(of: &table.pointee.ticket_secret) { raw in
            for i in 0..<min(raw.count, ticketSecret.count) { raw[i] = ticketSecret[i] }
        }
        table.pointee.ticket_period = tls.sessionTickets ? TLSServerContext.ticketPeriodSeconds : 0
        table.pointee.cached_period = -1
        for ctx in built { COpenSSL_install_callbacks(ctx, table) }
    }

    deinit {
        for ctx in contexts { SSL_CTX_free(ctx) }
        for s in nameStrings { free(s) }
        names.deallocate()
        nameContexts.deallocate()
        alpnWire?.deallocate()
        table.deallocate()
    }

    /// The context new connections start in (the default certificate).
    var defaultContext: OpaquePointer { contexts[0] }

    private static func context(_ tls: Config.TLS, certificate: Config.TLS.Certificate, listenerName: String) -> OpaquePointer? {
        guard let ctx = SSL_CTX_new(TLS_server_method()) else { return nil }
        var ok = true
        ok = ok && COpenSSL_CTX_set_min_proto_version(ctx, protocolVersion(tls.minVersion)) == 1
        ok = ok && SSL_CTX_set_cipher_list(ctx, tls.ciphers ?? Config.TLS.defaultCiphers) == 1
        ok = ok && SSL_CTX_set_ciphersuites(ctx, tls.ciphersuites ?? Config.TLS.defaultCiphersuites) == 1
        _ = COpenSSL_CTX_set_mode(ctx, COpenSSL_MODE_PARTIAL_WRITE | COpenSSL_MODE_MOVING_BUFFER | COpenSSL_MODE_RELEASE_BUFFERS)
        SSL_CTX_set_options(ctx, UInt64(COpenSSL_OP_NO_RENEGOTIATION | COpenSSL_OP_CIPHER_SERVER_PREFERENCE))
        if tls.sessionCacheSize > 0 {
            _ = COpenSSL_CTX_set_session_cache_mode(ctx, COpenSSL_SESS_CACHE_SERVER)
            _ = COpenSSL_CTX_sess_set_cache_size(ctx, tls.sessionCacheSize)
        } else {
            _ = COpenSSL_CTX_set_session_cache_mode(ctx, 0)
        }
        if !tls.sessionTickets { SSL_CTX_set_options(ctx, UInt64(COpenSSL_OP_NO_TICKET)) }
        let context = Array("l4lb:\(listenerName)".utf8.prefix(32))
        _ = SSL_CTX_set_session_id_context(ctx, context, UInt32(context.count))
        ok = ok && useCertificate(ctx, certificate)
        if ok, let auth = tls.clientAuth { ok = requireClientCertificates(ctx, auth) }
        guard ok else {
            ERR_clear_error()
            SSL_CTX_free(ctx)
            return nil
        }
        return ctx
    }

    /// The leaf, the rest of the chain, and the key, from the PEM bytes already checked.
    static func useCertificate(_ ctx: OpaquePointer, _ certificate: Config.TLS.Certificate) -> Bool {
        let chainOK = TLSMaterial.withBIO(certificate.chainPEM) { bio -> Bool in
            guard let leaf = PEM_read_bio_X509(bio, nil, nil, nil) else { return false }
            defer { X509_free(leaf) }
            guard SSL_CTX_use_certificate(ctx, leaf) == 1 else { return false }
            while let extra = PEM_read_bio_X509(bio, nil, nil, nil) {
                // The context owns `extra` once added.
                if COpenSSL_CTX_add_extra_chain_cert(ctx, extra) != 1 { X509_free(extra) }
            }
            ERR_clear_error()
            return true
        }
        guard chainOK, let key = TLSMaterial.privateKey(certificate.keyPEM) else { return false }
        defer { EVP_PKEY_free(key) }
        return SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1
    }

    private static func requireClientCertificates(_ ctx: OpaquePointer, _ auth: Config.TLS.ClientAuth) -> Bool {
        let store = SSL_CTX_get_cert_store(ctx)
        let added = TLSMaterial.withBIO(auth.caPEM) { bio -> Int in
            var n = 0
            while let ca = PEM_read_bio_X509(bio, nil, nil, nil) {
                X509_STORE_add_cert(store, ca)
                SSL_CTX_add_client_CA(ctx, ca)
                X509_free(ca)
                n += 1
            }
            return n
        }
        ERR_clear_error()
        guard added > 0 else { return false }
        if let crlPEM = auth.crlPEM {
            let ok = TLSMaterial.withBIO(crlPEM) { bio -> Bool in
                guard let crl = PEM_read_bio_X509_CRL(bio, nil, nil, nil) else { return false }
                defer { X509_CRL_free(crl) }
                return X509_STORE_add_crl(store, crl) == 1
            }
            guard ok else { return false }
            X509_STORE_set_flags(store, UInt(X509_V_FLAG_CRL_CHECK))
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (auth.required ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nil)
        SSL_CTX_set_verify_depth(ctx, 9)
        return true
    }

    static func protocolVersion(_ version: Config.TLS.Version) -> Int32 {
        switch version {
        case .tls10: return TLS1_VERSION
        case .tls11: return TLS1_1_VERSION
        case .tls12: return TLS1_2_VERSION
        case .tls13: return TLS1_3_VERSION
        }
    }

    /// Whether OpenSSL accepts at least one cipher (or TLS 1.3 suite) of `list`.
    static func acceptsCipherList(_ list: String, suites: Bool) -> Bool {
        guard let ctx = SSL_CTX_new(TLS_server_method()) else { return false }
        defer { SSL_CTX_free(ctx) }
        let ok = suites ? SSL_CTX_set_ciphersuites(ctx, list) == 1 : SSL_CTX_set_cipher_list(ctx, list) == 1
        ERR_clear_error()
        return ok
    }
}
