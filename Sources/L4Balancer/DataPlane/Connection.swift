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

    /// One direction of the byte stream. Small buffers arrive from a multishot receive that
    /// stays armed across sends; what arrives while a send is in flight waits in a short
    /// queue, and a second waiting buffer stops the receive (cancel) until the queue has
    /// drained, so a slow reader stops its writer after a few buffers. Large buffers
    /// (bulk) use one single-shot receive at a time, re-armed when its send completes.
    struct Stream {
        /// A receive is in flight: multishot (small buffers) or single-shot (large).
        var receiving = false
        var multishot = false
        /// A cancel is on its way to the multishot receive (backpressure, or switching to
        /// large buffers).
        var stopping = false
        /// A send of `buffer` is in flight.
        var sending = false
        /// The buffer ring was empty; re-armed when buffers return.
        var waitingForBuffer = false
        /// EOF received; forwarded once everything before it has been sent.
        var eof = false
        /// EOF forwarded with `shutdown(SHUT_WR)`.
        var finished = false
        /// The buffer being sent is from the large-buffer group.
        var large = false
        /// The last read filled a small buffer: bulk traffic, use large buffers.
        var prefersLarge = false
        /// Small buffers received while a send was in flight, oldest first, linked through
        /// the worker's per-buffer `queuedNext`.
        var queued: UInt16 = 0
        var queueHead: UInt16 = 0
        var queueTail: UInt16 = 0
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
