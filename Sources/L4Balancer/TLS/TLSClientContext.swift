internal import COpenSSL
import Atomics

#if canImport(Glibc)
import Glibc
#endif

/// One worker's OpenSSL client context for one cluster with `tls:` — l4lb speaking TLS to
/// the endpoints: versions, ciphers, ALPN, the trust store and name check (`verify`), a
/// client certificate, and session resumption through the worker's `UpstreamSessions`
/// (one session per endpoint). Built when the worker adopts a snapshot, freed with the
/// plans that use it.
final class TLSClientContext {
    let context: OpaquePointer
    let settings: Config.UpstreamTLS
    private let table: UnsafeMutablePointer<COpenSSL_ClientTable>
    /// Held: the table points into it.
    private let sessions: UpstreamSessions
    private let serverName: UnsafeMutablePointer<CChar>?
    /// Serials tell contexts apart in the session store (workers build theirs concurrently).
    private static let serials = ManagedAtomic<UInt64>(0)

    init?(_ tls: Config.UpstreamTLS, sessions: UpstreamSessions) {
        guard let ctx = SSL_CTX_new(TLS_client_method()) else { return nil }
        var ok = COpenSSL_CTX_set_min_proto_version(ctx, TLSServerContext.protocolVersion(tls.minVersion)) == 1
        ok = ok && SSL_CTX_set_cipher_list(ctx, tls.ciphers ?? Config.TLS.defaultCiphers) == 1
        ok = ok && SSL_CTX_set_ciphersuites(ctx, tls.ciphersuites ?? Config.TLS.defaultCiphersuites) == 1
        _ = COpenSSL_CTX_set_mode(ctx, COpenSSL_MODE_PARTIAL_WRITE | COpenSSL_MODE_MOVING_BUFFER | COpenSSL_MODE_RELEASE_BUFFERS)
        SSL_CTX_set_options(ctx, UInt64(COpenSSL_OP_NO_RENEGOTIATION))
        if tls.verify {
            if let ca = tls.caPEM {
                let store = SSL_CTX_get_cert_store(ctx)
                let added = TLSMaterial.withBIO(ca) { bio -> Int in
                    var n = 0
                    while let cert = PEM_read_bio_X509(bio, nil, nil, nil) {
                        X509_STORE_add_cert(store, cert)
                        X509_free(cert)
                        n += 1
                    }
                    return n
                }
                ok = ok && added > 0
            } else {
                ok = ok && SSL_CTX_set_default_verify_paths(ctx) == 1
            }
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
            SSL_CTX_set_verify_depth(ctx, 9)
        } else {
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nil)
        }
        if ok, let certificate = tls.clientCertificate { ok = TLSServerContext.useCertificate(ctx, certificate) }
        if ok, !tls.alpn.isEmpty {
            var wire: [UInt8] = []
            for name in tls.alpn {
                wire.append(UInt8(name.utf8.count))
                wire.append(contentsOf: name.utf8)
            }
            ok = SSL_CTX_set_alpn_protos(ctx, wire, UInt32(wire.count)) == 0
        }
        ERR_clear_error()
        guard ok else {
            SSL_CTX_free(ctx)
            return nil
        }
        context = ctx
        settings = tls
        self.sessions = sessions
        serverName = tls.serverName.map { strdup($0)! }
        table = .allocate(capacity: 1)
        let serial = TLSClientContext.serials.wrappingIncrementThenLoad(ordering: .relaxed)
        table.initialize(to: COpenSSL_ClientTable(store: sessions.store, serial: serial))
        COpenSSL_install_client_callbacks(ctx, table)
    }

    deinit {
        SSL_CTX_free(context)
        free(serverName)
        table.deallocate()
    }

    /// A new client connection to endpoint `endpoint` (its identity) on the connected
    /// `socket`: SNI set, and the identity to verify — `sni`, else the endpoint's IP
    /// address (an IP subjectAltName) — and the endpoint's last session offered.
    func connection(endpoint: Int, socket: Int32) -> OpaquePointer? {
        guard let ssl = SSL_new(context) else { return nil }
        if let serverName {
            _ = COpenSSL_set_tlsext_host_name(ssl, serverName)
            // "f*.example.com" names nothing: whole-label wildcards only.
            SSL_set_hostflags(ssl, UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS))
            if settings.verify, SSL_set1_host(ssl, serverName) != 1 {
                SSL_free(ssl)
                return nil
            }
        } else if settings.verify, COpenSSL_expect_peer_ip(ssl, socket) != 1 {
            SSL_free(ssl)
            return nil
        }
        COpenSSL_prepare_client(ssl, endpoint, settings.sessionReuse ? 1 : 0)
        SSL_set_connect_state(ssl)
        return ssl
    }
}

/// A worker's resumable upstream sessions, one per endpoint identity (`COpenSSL_SessionStore`).
/// The store is made when a cluster with `tls:` first needs it, from calloc's zeroed
/// pages, so entries never used cost no memory.
final class UpstreamSessions {
    private let capacity: Int
    private var made: UnsafeMutablePointer<COpenSSL_SessionStore>?

    init(capacity: Int) {
        self.capacity = capacity
    }

    var store: UnsafeMutablePointer<COpenSSL_SessionStore> {
        if let made { return made }
        let store = UnsafeMutablePointer<COpenSSL_SessionStore>.allocate(capacity: 1)
        let sessions = calloc(capacity, MemoryLayout<OpaquePointer?>.stride)!.assumingMemoryBound(to: OpaquePointer?.self)
        let serials = calloc(capacity, MemoryLayout<UInt64>.stride)!.assumingMemoryBound(to: UInt64.self)
        store.initialize(to: COpenSSL_SessionStore(sessions: sessions, serials: serials, capacity: Int32(capacity)))
        made = store
        return store
    }

    deinit {
        guard let store = made else { return }
        for i in 0..<capacity { if let s = store.pointee.sessions[i] { SSL_SESSION_free(s) } }
        free(store.pointee.sessions)
        free(store.pointee.serials)
        store.deallocate()
    }
}
