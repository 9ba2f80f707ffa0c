/// One proxied TCP connection: a client socket, an upstream socket, and the two byte
/// streams between them. A plain struct in the worker's slab; nothing is allocated per
/// connection.
struct Connection {
        enum State: UInt8 {
        case free
        /// Waiting for the upstream connect (attempt `attempts`).
        case connecting
        /// Connected; the PROXY protocol header is on its way to the upstream.
        case sendingProxyHeader
        case proxying
        /// Closing: waiting for the requests still in flight, then the sockets close.
        case closing
    }

    /// One direction of the byte stream. At most one receive or one send is in flight, so
    /// a direction holds at most one buffer and a slow reader stops its writer.
        struct Stream {
                enum State: UInt8 {
            case idle
            case receiving
            case sending
            /// The buffer ring was empty; re-armed when buffers return.
            case waitingForBuffer
            /// EOF received and forwarded with `shutdown(SHUT_WR)`.
            case finished
        }

        var state: State = .idle
        /// The receive in flight, or the buffer held, is from the large-buffer group.
        var large = false
        /// The last read filled a small buffer: bulk traffic, use large buffers.
        var prefersLarge = false
        var buffer: UInt16 = 0
        var length: Int32 = 0
        var sent: Int32 = 0
    }

    var generation: UInt32 = 0
    var state: State = .free
    var attempts: UInt8 = 0
    /// Whether this connection holds a place in its listener's and endpoint's active counts.
    var counted = false
    /// Whether it holds a place in its cluster's `max_connections`.
    var clusterAdmitted = false
    var listener: UInt16 = 0
    var cluster: UInt16 = 0
    var endpoint: Int32 = -1
    var client: Int32 = -1
    var upstream: Int32 = -1
    /// Requests in flight whose completions still name this slot.
    var inFlight: Int32 = 0
    /// Endpoints already tried (bit `index % 64`), so retries go elsewhere.
    var tried: UInt64 = 0
    /// Client → upstream.
    var toUpstream = Stream()
    /// Upstream → client.
    var toClient = Stream()
    /// Last time bytes moved, in timer ticks.
    var lastActivity: UInt32 = 0
    /// Timer wheel links (slot index + 1; 0 = none) and the bucket it is in.
    var timerPrevious: UInt32 = 0
    var timerNext: UInt32 = 0
    var timerBucket: UInt32 = UInt32.max
    var flowHash: UInt64 = 0
}
