/// A worker's listening sockets, by listener identity (`Config.Listener.id`).
///
/// Invariants:
/// - `entries[id].fd` is this worker's socket for listener `id`, or -1 when it serves
///   none; only `Worker.serve` sets it, only `Worker.retireListener` clears it.
/// - `armed` is true while the socket's one multishot operation is in flight: an accept
///   for TCP, a recvmsg for UDP (`isDatagram`). At most one is armed per socket.
/// - `serial` changes whenever `fd` does, and travels in the operation's user data, so a
///   completion of a retired socket is told from one of the socket that replaced it
///   (24 bits: the user data's generation field).
/// - A descriptor in `retiring` has its cancel in flight and is closed when the cancel
///   completes, never before: a cancel by descriptor must not find a reused number.
struct ListenerTable {
    struct Entry {
        var fd: Int32 = -1
        var armed = false
        var serial: UInt32 = 0
        /// Served with recvmsg (UDP) rather than accept.
        var isDatagram = false
    }

    private var entries: [Entry]
    /// The identities the current plan serves.
    var served: [Int] = []
    var retiring = Set<Int32>()
    /// Listeners a reload removed: their connections opened before `generation` are closed
    /// at `deadline` (monotonic ms) if still open.
    var removed: [(listener: Int, generation: UInt64, deadline: Int64)] = []

    init(capacity: Int) {
        entries = Array(repeating: Entry(), count: capacity)
    }

    subscript(id: Int) -> Entry {
        @inline(__always) get { entries[id] }
        @inline(__always) _modify { yield &entries[id] }
    }

    /// Whether a completion carrying `serial` belongs to listener `id`'s live socket.
    @inline(__always)
    func isLive(_ id: Int, serial: UInt32) -> Bool {
        serial == entries[id].serial && entries[id].fd >= 0
    }

    /// Listener `id` is now served by `fd`: a new serial, nothing armed yet.
    mutating func bind(_ id: Int, fd: Int32, isDatagram: Bool) {
        entries[id].fd = fd
        entries[id].isDatagram = isDatagram
        entries[id].serial = (entries[id].serial &+ 1) & 0xFF_FFFF
        entries[id].armed = false
    }
}
