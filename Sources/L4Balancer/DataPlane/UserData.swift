/// What a completion is about, packed into io_uring's 64-bit `user_data`:
/// operation (8 bits) | a 32-bit index | a 24-bit check.
/// - A connection's request: its slot and the slot's generation (a completion for a slot
///   since reused carries an old generation).
/// - A listener's accept or recvmsg (`.listener`): its identity and its socket's serial.
/// - A datagram in flight (`.datagram`): its buffer and its listener.
/// - A retired listener's cancel (`.retiring`): the socket's descriptor.
/// Each kind is built and read by its own names below, never by `slot` for another.
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

    static func listener(_ operation: Operation, _ id: Int, serial: UInt32) -> UserData {
        UserData(operation, slot: UInt32(id), generation: serial)
    }

    static func datagram(_ operation: Operation, buffer: UInt16, listener: Int) -> UserData {
        UserData(operation, slot: UInt32(buffer), generation: UInt32(listener))
    }

    static func retiring(_ fd: Int32) -> UserData {
        UserData(.listenerCancelled, slot: UInt32(bitPattern: fd))
    }

    var operation: Operation? { Operation(rawValue: UInt8(truncatingIfNeeded: raw)) }
    var slot: UInt32 { UInt32(truncatingIfNeeded: raw >> 8) }
    var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 40) }

    /// `.listener`: the listener's identity and its socket's serial.
    var listener: Int { Int(slot) }
    var serial: UInt32 { generation }
    /// `.datagram`: the buffer and the listener it came in on.
    var buffer: UInt16 { UInt16(truncatingIfNeeded: slot) }
    var datagramListener: Int { Int(generation) }
    /// `.retiring`: the listener socket.
    var descriptor: Int32 { Int32(bitPattern: slot) }
}
