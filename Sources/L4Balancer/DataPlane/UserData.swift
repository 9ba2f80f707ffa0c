/// What a completion is about, packed into io_uring's 64-bit `user_data`:
/// operation (8 bits) | slot index (32 bits) | slot generation (24 bits).
/// A completion for a slot that has since been reused carries an old generation.
struct UserData {
        enum Operation: UInt8 {
        case accept = 1
        case connect
        case linkTimeout
        case receiveFromClient
        case receiveFromUpstream
        case receiveLargeFromClient
        case receiveLargeFromUpstream
        case sendToUpstream
        case sendToClient
        case sendProxyHeader
        case tick
        case wake
        case cancel
        /// The cancel of a retired listener's accept (slot: the listener socket's fd).
        case listenerCancelled
        /// UDP (slot: the listener; the buffer id; the session).
        case datagramFromClient
        case datagramToUpstream
        case datagramFromUpstream
        case datagramToClient
        /// TLS: ciphertext from the client; ciphertext to it.
        case receiveCiphertextFromClient
        case sendCiphertextToClient
        case receiveLargeCiphertextFromClient
        /// `routes`: a peek at the client's first bytes; the poll that waits for more.
        case peekClientHello
        case clientHelloReadable
        /// TLS to the upstream (clusters with `tls:`): ciphertext from it; ciphertext to it.
        case receiveCiphertextFromUpstream
        case sendCiphertextToUpstream
        case receiveLargeCiphertextFromUpstream
    }

    var raw: UInt64
    init(raw: UInt64) { self.raw = raw }
    init(_ operation: Operation, slot: UInt32 = 0, generation: UInt32 = 0) {
        raw = UInt64(operation.rawValue) | UInt64(slot) << 8 | UInt64(generation & 0xFF_FFFF) << 40
    }

    var operation: Operation? { Operation(rawValue: UInt8(truncatingIfNeeded: raw)) }
    var slot: UInt32 { UInt32(truncatingIfNeeded: raw >> 8) }
    var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 40) }
}
