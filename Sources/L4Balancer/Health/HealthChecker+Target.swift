import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What the checker keeps per endpoint: an active check in progress (`Target`) and the
/// passive outlier detection's record (`Outlier`).
extension HealthChecker {
    /// One endpoint under active checks.
    struct Target {
        enum Phase { case idle, connecting, handshaking, sending, reading }

        /// The endpoint's identity.
        let endpoint: Int
        let cluster: String
        let address: SocketAddress
        let check: Config.HealthCheck
        /// What the check sends (a DNS query gets a fresh ID each time).
        var request: [UInt8]
        /// Clusters with `tls:`: the check runs over TLS, as the proxied connections do
        /// (`wantsTLS` with no context: it fails, never checks in plaintext).
        var wantsTLS = false
        var tls: TLSClientContext?
        var tlsClient: TLSSocketClient?
        /// TLS: what the socket must become for OpenSSL's next step (POLLIN or POLLOUT).
        var tlsWaits = Int16(POLLOUT)
        var queryID: UInt16 = 0
        var phase = Phase.idle
        var fd: Int32 = -1
        var started: Int64 = 0
        var deadline: Int64 = 0
        var nextDue: Int64 = 0
        var sent = 0
        var received: [UInt8] = []
        var passes = 0
        var failures = 0
        var healthy: Bool
        var checked = false
        var random: FastRandom
    }

    /// Outlier-detection bookkeeping for one endpoint.
    struct Outlier {
        /// The endpoint's and its cluster's identity.
        let endpoint: Int
        let cluster: Int
        let clusterName: String
        let address: SocketAddress
        let detection: Config.OutlierDetection
        var failuresAtLastSuccess: UInt64 = 0
        var lastSuccesses: UInt64 = 0
        var ejectedUntil: Int64 = 0
        var ejections = 0
        var returnedAt: Int64 = 0
    }
}
