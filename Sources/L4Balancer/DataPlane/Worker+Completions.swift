import URing

/// The prologue every completion of a connection's request goes through, before its
/// handler does anything else:
/// - a completion of the slot's earlier connection (another generation) is dropped, its
///   buffer given back;
/// - a request that ended lowers the connection's in-flight count;
/// - a connection in a state that no longer takes the completion (closing, or past the
///   step the request belonged to) gives back the buffer and, once nothing of it is in
///   flight, finishes its close.
/// Handlers that hold no buffer use `completedRecord`; receives use `receivedRecord`
/// (or `beginReceive` for a relay direction); sends, whose buffer the stream holds, use
/// `sentRecord` and give it back themselves.
extension Worker {
    /// The steps of a connection that take a receive's bytes.
    enum Receiving {
        /// The relay: `.proxying`.
        case relay
        /// The relay, the TLS handshakes and the connect (bytes wait in OpenSSL's input).
        case opening
        /// Reading the ClientHello for routing: `.inspecting`.
        case inspection
    }

    /// The record, when the completion is its current connection's; for a request that
    /// ended (`ended`), one request fewer in flight.
    @inline(__always)
    func currentRecord(_ userData: UserData, ended: Bool) -> UnsafeMutablePointer<Connection>? {
        let record = slab[userData.slot]
        guard record.pointee.generation == userData.generation else { return nil }
        if ended { record.pointee.inFlight -= 1 }
        return record
    }

    /// A send's completion: the record, or nil when stale. The send's buffer is still the
    /// stream's; the caller gives it back (and finishes a close) on every path.
    @inline(__always)
    func sentRecord(_ userData: UserData) -> UnsafeMutablePointer<Connection>? {
        currentRecord(userData, ended: true)
    }

    /// A completion that holds no buffer: the record, when the completion is its current
    /// connection's and the connection is still `state`; nil when it is stale, or the
    /// connection has moved on (its close finished here once nothing is in flight).
    @inline(__always)
    func completedRecord(_ userData: UserData, expecting state: Connection.State) -> UnsafeMutablePointer<Connection>? {
        guard let record = currentRecord(userData, ended: true) else { return nil }
        guard record.pointee.state == state else {
            finishClosing(userData.slot)
            return nil
        }
        return record
    }

    /// `completedRecord` for a request whose failure (or a result of 0: nothing sent, or a
    /// poll that saw nothing) ends the connection: closed here, and nil.
    @inline(__always)
    func succeededRecord(_ completion: Completion, _ userData: UserData, expecting state: Connection.State) -> UnsafeMutablePointer<Connection>? {
        guard let record = completedRecord(userData, expecting: state) else { return nil }
        guard completion.result > 0 else {
            close(userData.slot, reason: Worker.reason(completion.result))
            return nil
        }
        return record
    }

    /// A receive's completion: takes its buffer (if any); the record when the completion is
    /// its current connection's and the connection is at a step that takes bytes
    /// (`receiving`). Otherwise the buffer is given back, the close finished once nothing
    /// is in flight, and nil returned.
    @inline(__always)
    func receivedRecord(_ completion: Completion, _ userData: UserData, large: Bool, in receiving: Receiving) -> UnsafeMutablePointer<Connection>? {
        let buffer = completion.bufferID
        if buffer != nil { handedOut(large: large) }
        let more = completion.hasMore
        guard let record = currentRecord(userData, ended: !more) else {
            if let buffer { recycle(buffer, large: large) }
            return nil
        }
        let state = record.pointee.state
        let takes = switch receiving {
        case .relay: state == .proxying
        case .opening: state != .closing && state != .free
        case .inspection: state == .inspecting
        }
        guard takes else {
            if let buffer { recycle(buffer, large: large) }
            if !more { finishClosing(userData.slot) }
            return nil
        }
        return record
    }

    /// A relay direction's receive (`receivedRecord`), which also notes that a receive that
    /// ended is no longer armed.
    @inline(__always)
    func beginReceive(
        _ completion: Completion, _ userData: UserData, toUpstream: Bool, large: Bool, duringOpening: Bool
    ) -> (record: UnsafeMutablePointer<Connection>, stream: UnsafeMutablePointer<Connection.Stream>)? {
        guard let record = receivedRecord(completion, userData, large: large, in: duringOpening ? .opening : .relay) else { return nil }
        let s = stream(record, toUpstream: toUpstream)
        if !completion.hasMore { s.pointee.receiveArmed = false }
        return (record, s)
    }

    /// The epilogue of queueing a connection's request: one more in flight; or, when the
    /// submission queue refused it, counted and the connection closed. Its result is
    /// whether the request was queued.
    @inline(__always) @discardableResult
    func queued(_ prepared: Bool, _ slot: UInt32, _ record: UnsafeMutablePointer<Connection>) -> Bool {
        guard prepared else {
            stats.add(.submissionDrops)
            close(slot, reason: .error)
            return false
        }
        record.pointee.inFlight += 1
        return true
    }
}
