import Foundation

/// What `/discovery` shows of the xDS stream: whether it is up, and per resource type the
/// accepted version, the last nonce and the last NACK.
extension XDSClient {
    /// One resource type's state, as `/discovery` shows it.
    struct Subscription: Sendable {
        /// The last accepted version ("" before the first).
        var version = ""
        /// The nonce of the last response received.
        var nonce = ""
        var resourceNames: [String] = []
        var resources = 0
        var accepted: UInt64 = 0
        var rejected: UInt64 = 0
        var lastAccepted: Date?
        var lastNACK: NACK?
    }

    struct NACK: Sendable {
        let version: String
        let nonce: String
        let error: String
        let at: Date
    }

    struct Status: Sendable {
        var connected = false
        var connectedSince: Date?
        /// Monotonic ms since the stream was last lost (nil while connected or before the first).
        var disconnectedAt: Int64?
        var streams: UInt64 = 0
        var lastError: String?
        var lastErrorAt: Date?
        var nextAttemptAt: Int64?
        var clusters = Subscription()
        var assignments = Subscription()
        /// Per cluster, the Envoy fields it carries that l4lb leaves aside.
        var ignored: [String: [String]] = [:]
    }
}
