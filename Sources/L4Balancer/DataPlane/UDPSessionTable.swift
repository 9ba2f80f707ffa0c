import URing

#if canImport(Glibc)
import Glibc
#endif

/// A UDP client as the session table keys it: family, port and address, as the kernel
/// reported the datagram's sender.
public struct UDPClientKey: Hashable {
    var high: UInt64
    var low: UInt64
    var portAndFamily: UInt32

    public init?(_ name: UnsafeRawPointer, length: Int) {
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
///
/// Per-packet listeners (`session: none`) use the same records without the dictionary: a
/// record is an upstream socket lent to one datagram's client until its replies are in,
/// then kept in a pool per (listener, endpoint) for the next datagram to that endpoint.
public struct UDPSessionTable {
    struct Session {
        var key: UDPClientKey
        /// The client's address, as replies are sent to it.
        var client = sockaddr_in6()
        var clientLength: socklen_t = 0
        /// The address the client sent to, for a listener bound to a wildcard address.
        var local: PacketDestination?
        var upstream: Int32 = -1
        var endpoint: Int32 = -1
        var cluster: Int32 = -1
        var listener: UInt16 = 0
        var lastTick: UInt32 = 0
        /// Bumped when the slot is freed: completions for an older session are stale.
        var generation: UInt32 = 0
        var previous: UInt32 = UDPSessionTable.none
        var next: UInt32 = UDPSessionTable.none
        /// Datagrams from the client and replies relayed in the current lease.
        var requests: UInt32 = 0
        var replies: UInt32 = 0
        /// For the access log: when the lease began, and its bytes each way.
        var startedAt: Int64 = 0
        var bytesFromClient: UInt64 = 0
        var bytesFromUpstream: UInt64 = 0
        var receiveArmed = false
        var live = false
        /// Lent to a client (always, for per-client sessions); false while pooled.
        var leased = false
        /// Found by its client key (per-client sessions); per-packet records are not.
        var indexed = true
        /// Carried by the kernel's relay (`Worker.relayedSessions` has its flows).
        var relayed = false
        /// Its place among its source's `rate_limit` `max_connections` (table slot + 1; 0:
        /// none).
        var sourcePlace: UInt32 = 0
    }

    static let none = UInt32.max
    private(set) var sessions: [Session] = []
    private var free: [UInt32] = []
    private var index: [UDPClientKey: UInt32] = [:]
    /// Per listener identity: the least and most recently active session, and the count.
    private var heads: [UInt32]
    private var tails: [UInt32]
    public private(set) var counts: [Int]
    /// Per-packet records not lent out, per (listener, endpoint identity): slot and
    /// generation, checked when taken (a record may have ended while pooled).
    private var pools: [UInt64: [UInt64]] = [:]
    private(set) var live = 0
    /// The generation new records start at (raised when the table gives its memory back).
    private var generationFloor: UInt32 = 0

    public init(listeners: Int) {
        heads = Array(repeating: UDPSessionTable.none, count: listeners)
        tails = heads
        counts = Array(repeating: 0, count: listeners)
    }

    public var active: Int { live }

    public func find(_ key: UDPClientKey) -> UInt32? { index[key] }

    /// Whether `slot` holds a session, and the generation its requests carry.
    public func isLive(_ slot: UInt32) -> Bool { Int(slot) < sessions.count && sessions[Int(slot)].live }
    public func generation(_ slot: UInt32) -> UInt32 { sessions[Int(slot)].generation }

    subscript(slot: UInt32) -> Session {
        get { sessions[Int(slot)] }
        _modify { yield &sessions[Int(slot)] }
    }

    /// A new session for `key` on `listener`, most recently active; `indexed: false` for a
    /// per-packet record, which `find` does not return.
    public mutating func insert(_ key: UDPClientKey, listener: UInt16, tick: UInt32, indexed: Bool = true) -> UInt32 {
        let slot: UInt32
        if let reused = free.popLast() {
            slot = reused
        } else {
            slot = UInt32(sessions.count)
            sessions.append(Session(key: key, generation: generationFloor))
        }
        let generation = sessions[Int(slot)].generation
        sessions[Int(slot)] = Session(key: key, listener: listener, lastTick: tick, generation: generation, live: true, leased: true, indexed: indexed)
        if indexed { index[key] = slot }
        live += 1
        link(slot)
        return slot
    }

    /// Frees `slot` (its socket is the caller's to close).
    public mutating func remove(_ slot: UInt32) {
        guard sessions[Int(slot)].live else { return }
        unlink(slot)
        if sessions[Int(slot)].indexed { index[sessions[Int(slot)].key] = nil }
        live -= 1
        sessions[Int(slot)].live = false
        sessions[Int(slot)].generation = (sessions[Int(slot)].generation &+ 1) & 0xFF_FFFF
        free.append(slot)
        if live == 0, sessions.count >= UDPSessionTable.keptWhenEmpty { release() }
    }

    /// A table this large gives its memory back when its last session ends (after a
    /// burst of clients, RSS returns to where it was).
    public static let keptWhenEmpty = 4096

    /// Frees the records, index and pools. New records start past every generation used
    /// so far, so a completion still in flight for a freed slot stays stale.
    private mutating func release() {
        let floor = sessions.reduce(0) { max($0, $1.generation) } &+ 1
        generationFloor = floor & 0xFF_FFFF
        sessions = []
        free = []
        index = [:]
        pools = [:]
        // Give the freed pages back to the kernel now (glibc keeps them otherwise): once,
        // when a burst is over, never per session.
        _ = releaseFreeHeapPages(0)
    }

    /// Activity on `slot`: it moves to the end of its listener's list.
    public mutating func touch(_ slot: UInt32, tick: UInt32) {
        sessions[Int(slot)].lastTick = tick
        guard tails[Int(sessions[Int(slot)].listener)] != slot else { return }
        unlink(slot)
        link(slot)
    }

    /// Puts a per-packet record, no longer lent, in its pool.
    mutating func pool(_ slot: UInt32) {
        let session = sessions[Int(slot)]
        pools[UDPSessionTable.poolKey(Int(session.listener), Int(session.endpoint)), default: []].append(UInt64(session.generation) << 32 | UInt64(slot))
    }

    /// A pooled record of `listener` connected to `endpoint`, taken out of the pool.
    mutating func takePooled(listener: Int, endpoint: Int) -> UInt32? {
        let key = UDPSessionTable.poolKey(listener, endpoint)
        while let entry = pools[key]?.popLast() {
            let slot = UInt32(truncatingIfNeeded: entry), generation = UInt32(truncatingIfNeeded: entry >> 32)
            let session = sessions[Int(slot)]
            if session.live, !session.leased, session.generation == generation { return slot }
        }
        return nil
    }

    private static func poolKey(_ listener: Int, _ endpoint: Int) -> UInt64 { UInt64(listener) << 32 | UInt64(UInt32(truncatingIfNeeded: endpoint)) }

    /// The least recently active session of `listener`.
    public func oldest(_ listener: Int) -> UInt32? {
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

/// glibc's `malloc_trim` (not in Swift's Glibc module): returns free heap pages to the kernel.
@_silgen_name("malloc_trim")
private func releaseFreeHeapPages(_ pad: Int) -> Int32
