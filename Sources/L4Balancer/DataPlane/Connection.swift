import Atomics

/// One proxied TCP connection: a client socket, an upstream socket, and the two byte
/// streams between them. A plain struct in the worker's slab; nothing is allocated per
/// connection.
struct Connection {
    enum State: UInt8 {
        case free
        /// Waiting for the upstream connect (attempt `attempts`).
        case connecting
        /// TLS: the handshake with the client runs; the upstream is not connected yet.
        case handshaking
        /// `routes`: waiting for the whole ClientHello (peeked, left in the socket).
        case inspecting
        /// Connected; the PROXY protocol header is on its way to the upstream.
        case sendingProxyHeader
        /// The cluster has `tls:`: the handshake with the upstream runs (after the PROXY
        /// header, which goes in the clear as HAProxy's `send-proxy` does).
        case upstreamHandshaking
        case proxying
        /// Closing: waiting for the requests still in flight, then the sockets close.
        case closing
    }

    /// The lifecycle, checked as `Stream.move(to:)` checks a direction: `free` (the slab
    /// resets a released record) → `connecting` on accept; a TLS listener's `handshaking`
    /// and a routed listener's `inspecting` come back to `connecting` once the cluster is
    /// known; then `sendingProxyHeader` and/or `upstreamHandshaking` when configured, then
    /// `proxying`; any open state → `closing`.
    @inline(__always)
    mutating func move(to next: State) {
        RelayChecks.check(Connection.isLegal(from: state, to: next), "connection: \(state) → \(next)")
        state = next
    }

    /// The lifecycle's transition table.
    static func isLegal(from: State, to: State) -> Bool {
        switch (from, to) {
        case (.free, .connecting),
            (.connecting, .handshaking), (.connecting, .inspecting), (.connecting, .sendingProxyHeader),
            (.connecting, .upstreamHandshaking), (.connecting, .proxying),
            (.handshaking, .connecting), (.inspecting, .connecting),
            (.sendingProxyHeader, .upstreamHandshaking), (.sendingProxyHeader, .proxying),
            (.upstreamHandshaking, .proxying):
            return true
        case (.free, .closing), (.closing, _):
            return false
        case (_, .closing):
            return true
        default:
            return false
        }
    }

    /// One direction of the byte stream: bytes received from its source socket are sent to
    /// its destination socket in the buffer they arrived in.
    ///
    /// **Memory contract.** A direction holds at most two small buffers (the one being
    /// sent, and one filling behind it) or one large buffer, whatever its peers do:
    /// - a receive is armed only while the direction holds nothing;
    /// - a small receive is multishot with a total limit of one small buffer, so the kernel
    ///   ends it by itself: every completion but the last of one arm brings less than a
    ///   buffer in all, the last at most one more buffer;
    /// - bytes that arrive while a send is in flight are copied onto the end of the buffer
    ///   being sent (or of the one behind it), so one arm never needs a third buffer;
    /// - a large receive is single-shot and re-armed only after its send has completed.
    /// (Without the kernel's limit, Linux < 6.16, small receives are single-shot too.)
    ///
    /// **States** (`state`; `receiveArmed` says whether a receive request is armed):
    ///
    /// | from | event | to |
    /// |---|---|---|
    /// | receiving | bytes arrive | sending |
    /// | receiving | the arm ends without bytes (limit, or re-armed) | receiving |
    /// | receiving | `ENOBUFS` | waitingForBuffer (queued in `BufferWaitQueue`) |
    /// | receiving | EOF | finished (FIN forwarded with `shutdown(SHUT_WR)`) |
    /// | receiving | EOF, TLS: close_notify still to be sent | flushingBeforeEOF |
    /// | sending | bytes arrive (appended, or the buffer behind) | sending |
    /// | sending | a partial send, or the next buffer starts | sending |
    /// | sending | everything sent (re-armed if the arm had ended) | receiving |
    /// | sending | everything sent, but the re-arm could not be queued | waitingForBuffer |
    /// | sending | EOF | flushingBeforeEOF |
    /// | waitingForBuffer | buffers return, re-armed | receiving |
    /// | flushingBeforeEOF | a partial send, or the next buffer starts | flushingBeforeEOF |
    /// | flushingBeforeEOF | everything sent | finished |
    ///
    /// An error on either socket, a timeout or a drain closes the whole connection from any
    /// state. Debug builds assert every move against this table (`move(to:)`).
    struct Stream {
        enum State: UInt8 {
            /// Nothing held; a receive is armed.
            case receiving
            /// `buffer` (and maybe `pending`) held; a send of `buffer` is in flight.
            case sending
            /// Nothing held, nothing in flight: queued until buffers return.
            case waitingForBuffer
            /// EOF received; what came before it is still being sent.
            case flushingBeforeEOF
            /// EOF forwarded; nothing held, nothing in flight.
            case finished
        }

        static let noBuffer: UInt16 = .max

        var state = State.receiving
        /// A receive request of this direction is armed (a multishot one until its
        /// completion without `hasMore`).
        var receiveArmed = false
        /// The buffer being sent is from the large-buffer group.
        var large = false
        /// The last read filled a small buffer: bulk traffic, use large buffers.
        var prefersLarge = false
        /// The buffer being sent: bytes `sent..<length` are still to go.
        var buffer: UInt16 = 0
        /// A small buffer waiting behind `buffer`, holding `pendingLength` bytes.
        var pending = Stream.noBuffer
        var pendingLength: Int32 = 0
        var length: Int32 = 0
        var sent: Int32 = 0
        /// When the send in flight last made progress (timer ticks), for `send_timeout`.
        var sendProgress: UInt32 = 0

        var isSending: Bool { state == .sending || state == .flushingBeforeEOF }

        /// Takes `buffer` (holding `length` bytes) as the one to send, from its start.
        @inline(__always)
        mutating func hold(_ buffer: UInt16, length: Int32, large: Bool, at tick: UInt32) {
            self.buffer = buffer
            self.large = large
            self.length = length
            sent = 0
            sendProgress = tick
        }

        /// Checked in every build: debug builds stop at a transition outside the table,
        /// release builds make it and count it (`RelayChecks`), so the whole suite, which
        /// runs release builds, fails on one.
        @inline(__always)
        mutating func move(to next: State) {
            RelayChecks.check(Stream.isLegal(from: state, to: next), "relay: \(state) → \(next)")
            state = next
        }

        /// The transition table above.
        static func isLegal(from: State, to: State) -> Bool {
            switch (from, to) {
            case (.receiving, .sending), (.receiving, .receiving), (.receiving, .waitingForBuffer), (.receiving, .finished),
                (.receiving, .flushingBeforeEOF),
                (.sending, .sending), (.sending, .receiving), (.sending, .flushingBeforeEOF), (.sending, .waitingForBuffer),
                (.waitingForBuffer, .receiving),
                (.flushingBeforeEOF, .flushingBeforeEOF), (.flushingBeforeEOF, .finished):
                return true
            default:
                return false
            }
        }
    }

    var generation: UInt32 = 0
    var state: State = .free
    var attempts: UInt8 = 0
    /// Entries of the worker's side table of tried endpoints at index 64 and above.
    var triedAbove64: UInt8 = 0
    /// What this connection holds a place in (released once, on close). One byte, so the
    /// record stays at 112 bytes.
    var holds = Holds()
    /// TLS on either side, and what inspection learned (one byte, as `holds`).
    var flags = Flags()
    /// The worker plan it was opened under (`WorkerPlan.index`).
    var plan: UInt16 = 0
    /// The listener's identity; the cluster's position in the plan's snapshot.
    var listener: UInt16 = 0
    var cluster: UInt16 = 0
    /// The endpoint's identity (-1: none yet).
    var endpoint: Int32 = -1
    var client: Int32 = -1
    var upstream: Int32 = -1
    /// Requests in flight whose completions still name this slot.
    var inFlight: Int32 = 0
    /// Endpoints already tried (below 64: a bit each; others in the worker's side table).
    var tried: UInt64 = 0
    /// Client → upstream.
    var toUpstream = Stream()
    /// Upstream → client.
    var toClient = Stream()
    /// Last time bytes moved either way (received or sent), in timer ticks.
    var lastActivity: UInt32 = 0

    /// Timer wheel links (slot index + 1; 0 = none) and the bucket it is in.
    var timerPrevious: UInt32 = 0
    var timerNext: UInt32 = 0
    var timerBucket: UInt32 = UInt32.max
    var flowHash: UInt64 = 0

    struct Holds: OptionSet {
        let rawValue: UInt8
        /// Its listener's active count.
        static let listenerActive = Holds(rawValue: 1)
        /// The shared `max_connections` counts of its cluster / listener / endpoint (only
        /// those with a limit are counted).
        static let clusterPlace = Holds(rawValue: 2)
        static let listenerPlace = Holds(rawValue: 4)
        static let endpointPlace = Holds(rawValue: 8)
        /// A place among its source's `rate_limit` `max_connections` (the slot is in the
        /// worker's `sourcePlaces`).
        static let sourcePlace = Holds(rawValue: 16)
    }

    struct Flags: OptionSet {
        let rawValue: UInt8
        /// TLS terminated here: OpenSSL state in the worker's `side.tls`.
        static let tls = Flags(rawValue: 1)
        /// TLS to the upstream: OpenSSL state in the worker's `side.upstreamTLS`.
        static let upstreamTLS = Flags(rawValue: 2)
        /// `.inspecting`: the client half-closed (its ClientHello can grow no more).
        static let clientHalfClosed = Flags(rawValue: 4)
    }

    var tls: Bool {
        get { flags.contains(.tls) }
        set { if newValue { flags.insert(.tls) } else { flags.remove(.tls) } }
    }
    var upstreamTLS: Bool {
        get { flags.contains(.upstreamTLS) }
        set { if newValue { flags.insert(.upstreamTLS) } else { flags.remove(.upstreamTLS) } }
    }

    // While `.inspecting`, no byte is relayed yet and `toUpstream` is idle (it is reset
    // when the relay starts); its two lengths hold the inspection's numbers, by these names.

    /// `.inspecting`: the bytes the last peek saw.
    var inspectedBytes: Int32 {
        get { toUpstream.length }
        set { toUpstream.length = newValue }
    }
    /// `.inspecting`: the raised `SO_RCVLOWAT` (0: unchanged).
    var inspectionLowWater: Int32 {
        get { toUpstream.pendingLength }
        set { toUpstream.pendingLength = newValue }
    }

    var counted: Bool {
        get { holds.contains(.listenerActive) }
        set { if newValue { holds.insert(.listenerActive) } else { holds.remove(.listenerActive) } }
    }
    var clusterAdmitted: Bool {
        get { holds.contains(.clusterPlace) }
        set { if newValue { holds.insert(.clusterPlace) } else { holds.remove(.clusterPlace) } }
    }
    var listenerLimited: Bool {
        get { holds.contains(.listenerPlace) }
        set { if newValue { holds.insert(.listenerPlace) } else { holds.remove(.listenerPlace) } }
    }
    var endpointLimited: Bool {
        get { holds.contains(.endpointPlace) }
        set { if newValue { holds.insert(.endpointPlace) } else { holds.remove(.endpointPlace) } }
    }
}

/// Transitions made outside a state table: a bug in l4lb, never a peer's doing. Counted
/// process-wide (an atomic add, only on that path); `/stats` (`relay_state_violations`),
/// `/metrics` and the exit summary show the count, and the end-to-end tests fail on any.
enum RelayChecks {
    static let violations = ManagedAtomic<Int>(0)

    /// Debug builds stop at an illegal transition; release builds count it and go on.
    /// `transition` is built only then.
    @inline(__always)
    static func check(_ legal: Bool, _ transition: @autoclosure () -> String) {
        if _slowPath(!legal) {
            violations.wrappingIncrement(ordering: .relaxed)
            assertionFailure("\(transition()) is not in the table")
        }
    }
}
