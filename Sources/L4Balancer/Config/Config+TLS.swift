/// `listeners[].tls`: TLS termination (DESIGN §6). The parser reads and checks every PEM
/// file (`TLSMaterial`), so the config carries the bytes it was checked with: a reload
/// that finds a changed certificate is a changed config, and workers never read files.
extension Config {
    public struct TLS: Sendable, Equatable {
        public enum Version: String, Sendable, CaseIterable {
            case tls10 = "1.0", tls11 = "1.1", tls12 = "1.2", tls13 = "1.3"
        }

        public struct Certificate: Sendable, Equatable {
            public var certPath: String
            public var keyPath: String
            /// The certificate and its chain, and the key, as read (PEM).
            public var chainPEM: [UInt8]
            public var keyPEM: [UInt8]
            /// The DNS names it serves (subjectAltName, else CN) — what SNI picks it by.
            public var names: [String]
            /// notAfter, seconds since the epoch.
            public var notAfter: Int64
        }

        public struct ClientAuth: Sendable, Equatable {
            public var caPath: String
            public var caPEM: [UInt8]
            public var required = true
            public var crlPath: String?
            public var crlPEM: [UInt8]?
        }

        /// The first is the default (no SNI, or a name no certificate has).
        public var certificates: [Certificate] = []
        public var minVersion = Version.tls12
        /// OpenSSL cipher-list syntax (TLS ≤ 1.2) and TLS 1.3 suites; nil = the defaults below.
        public var ciphers: String?
        public var ciphersuites: String?
        public var alpn: [String] = []
        public var sessionTickets = true
        /// Sessions each worker's cache holds (0: no server-side cache, tickets only).
        public var sessionCacheSize = 20_000
        public var clientAuth: ClientAuth?
        public var handshakeTimeout: ConfigDuration = .seconds(10)

        /// Forward-secret AEAD suites only, ECDSA before RSA (Mozilla "intermediate").
        public static let defaultCiphers =
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
            + "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
        public static let defaultCiphersuites = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

        public init() {}
    }

    /// `clusters[].tls`: TLS from l4lb to the cluster's endpoints (l4lb is the client).
    public struct UpstreamTLS: Sendable, Equatable {
        /// The name sent as SNI and, with `verify`, the name the certificate must carry.
        public var serverName: String?
        /// Trusted authorities (PEM); nil: the system's trust store.
        public var caPath: String?
        public var caPEM: [UInt8]?
        /// Check the endpoint's certificate (chain to `ca`, and `sni` when set).
        public var verify = true
        /// Presented to endpoints that ask for a client certificate (mTLS to the upstream).
        public var clientCertificate: TLS.Certificate?
        public var minVersion = TLS.Version.tls12
        public var ciphers: String?
        public var ciphersuites: String?
        public var alpn: [String] = []
        /// Resume sessions with each endpoint (one cached session per endpoint per worker).
        public var sessionReuse = true

        public init() {}
    }
}
