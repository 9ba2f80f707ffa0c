#if canImport(Glibc)
import Glibc
#endif

/// A UDP client as the session table keys it: family, port and address, as the kernel
/// reported the datagram's sender.
struct UDPClientKey: Hashable {
    var high: UInt64
    var low: UInt64
    var portAndFamily: UInt32

    init?(_ name: UnsafeRawPointer, length: Int) {
        switch Int32(name.load(as: sa_family_t.self)) {
        case AF_INET where length >= MemoryLayout<sockaddr_in>.size:
            let sin = name.load(as: sockaddr_in.self)
            high = 0
            low = UInt64(sin.sin_addr.s_addr)
            portAndFamily = UInt32(sin.sin_port) | UInt32(AF_INET) << 16
        case AF_INET6 where length >= MemoryLayout<sockaddr_in6>.size:
            let sin6 = name.load(as: sockaddr_in6.self)
            (high, low) = withUnsafeBytes(of: sin6.sin6_addr) { ($0.loadUnaligned(as: UInt64.self), $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
            portAndFamily = UInt32(sin6.sin6_port) | UInt32(AF_INET6) << 16
        default:
            return nil
        }
    }
}

/// One worker's UDP sessions: a client address → a connected upstream socket to the
/// endpoint the balancer chose for it. Records live in one array (no allocation per
/// session once it has grown), found through a dictionary, and kept per listener in
/// least-recently-active order, so idle expiry and `max_sessions` eviction take the head.
struct UDPSessionTable {
    struct Session {
        var key: UDPClientKey
        /// The client's address, as replies are sent to it.
        var client = sockaddr_in6()
        var clientLength: socklen_t = 0
        var upstream: Int32 = -1
        var endpoint: Int32 = -1
        var cluster: Int32 = -1
        var listener: UInt16 = 0
        var lastTick: UInt32 = 0
        /// Bumped when the slot is freed: completions for an older session are stale.
        var generation: UInt32 = 0
        var previous: UInt32 = UDPSessionTable.none
        var next: UInt32 = UDPSessionTable.none
        var receiveArmed = false
        var live = false
    }

    static let none = UInt32.max
    private(set) var sessions: [Session] = []
    private var free: [UInt32] = []
    private var index: [UDPClientKey: UInt32] = [:]
    /// Per listener identity: the least and most recently active session, and the count.
    private var heads: [UInt32]
    private var tails: [UInt32]
    private(set) var counts: [Int]

    init(listeners: Int) {
        heads = Array(repeating: UDPSessionTable.none, count: listeners)
        tails = heads
        counts = Array(repeating: 0, count: listeners)
    }

    var active: Int { index.count }

    func find(_ key: UDPClientKey) -> UInt32? { index[key] }

    subscript(slot: UInt32) -> Session {
        get { sessions[Int(slot)] }
        _modify { yield &sessions[Int(slot)] }
    }

    /// A new session for `key` on `listener`, most recently active.
    mutating func insert(_ key: UDPClientKey, listener: UInt16, tick: UInt32) -> UInt32 {
        let slot: UInt32
        if let reused = free.popLast() {
            slot = reused
        } else {
            slot = UInt32(sessions.count)
            sessions.append(Session(key: key))
        }
        let generation = sessions[Int(slot)].generation
        sessions[Int(slot)] = Session(key: key, listener: listener, lastTick: tick, generation: generation, live: true)
        index[key] = slot
        link(slot)
        return slot
    }

    /// Frees `slot` (its socket is the caller's to close).
    mutating func remove(_ slot: UInt32) {
        guard sessions[Int(slot)].live else { return }
        unlink(slot)
        index[sessions[Int(slot)].key] = nil
        sessions[Int(slot)].live = false
        sessions[Int(slot)].generation = (sessions[Int(slot)].generation &+ 1) & 0xFF_FFFF
        free.append(slot)
    }

    /// Activity on `slot`: it moves to the end of its listener's list.
    mutating func touch(_ slot: UInt32, tick: UInt32) {
        sessions[Int(slot)].lastTick = tick
        guard tails[Int(sessions[Int(slot)].listener)] != slot else { return }
        unlink(slot)
        link(slot)
    }

    /// The least recently active session of `listener`.
    func oldest(_ listener: Int) -> UInt32? {
        heads[listener] == UDPSessionTable.none ? nil : heads[listener]
    }

    private mutating func link(_ slot: UInt32) {
        let listener = Int(sessions[Int(slot)].listener)
        sessions[Int(slot)].previous = tails[listener]
        sessions[Int(slot)].next = UDPSessionTable.none
        if tails[listener] != UDPSessionTable.none { sessions[Int(tails[listener])].next = slot } else { heads[listener] = slot }
        tails[listener] = slot
        counts[listener] += 1
    }

    private mutating func unlink(_ slot: UInt32) {
        let listener = Int(sessions[Int(slot)].listener)
        let previous = sessions[Int(slot)].previous, next = sessions[Int(slot)].next
        if previous != UDPSessionTable.none { sessions[Int(previous)].next = next } else { heads[listener] = next }
        if next != UDPSessionTable.none { sessions[Int(next)].previous = previous } else { tails[listener] = previous }
        counts[listener] -= 1
    }
}
