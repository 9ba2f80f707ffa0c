import Atomics

#if canImport(Glibc)
import Glibc
#endif

/// Per-source state every worker shares, for `rate_limit`: one cache line per (listener,
/// source prefix) with its token buckets, its concurrent connections and what was limited
/// lately. Fixed capacity, open addressing over a short probe window, lock-free: every
/// word is an atomic, and a slot changes hands only with a compare-and-swap of its first
/// word, which packs the key's tag with the connection count, so a slot that holds a
/// connection is never given to another source.
///
/// Buckets are GCRA (the generic cell rate algorithm): a bucket is one word, the time its
/// next unit would be "due" (TAT). A unit is allowed while that time runs at most
/// `burst` intervals ahead of now, and moves it one interval on — a token bucket with one
/// atomic word and no refill step.
///
/// When a source's probe window is full, the least recently active source holding no
/// connection is forgotten (counted in `evictions`); if every source there holds one, the
/// new source goes untracked and is let through (counted in `untracked`) — the table
/// degrades, it never refuses clients for being full.
public final class SourceTable: @unchecked Sendable {
    /// Word offsets within a slot.
    public enum Word: Int, Sendable {
        /// tag (40 bits, never 0 in use) << 24 | connections (24 bits).
        case tagAndPlaces = 0
        case connectionTAT, packetTAT
        /// minute << 44 | limited count in that minute.
        case limitedWindow
        /// Limited in the minute before `limitedWindow`'s.
        case limitedPrevious
        /// The key, for reports: masked address, and listener << 16 | family << 8 | prefix
        /// length, with the reasons limited (bits 56…) OR-ed in.
        case addressHigh, addressLow, meta
    }

    static let wordsPerSlot = 8
    static let probe = 8
    static let placeBits: UInt64 = 24
    static let placeMask: UInt64 = (1 << placeBits) - 1
    static let minuteNanoseconds: UInt64 = 60_000_000_000

    let capacity: Int
    let mask: Int
    private let words: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let counters: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

    public enum Counter: Int, CaseIterable, Sendable { case evictions, untracked, tracked }

    /// `capacity`: a power of two.
    public init(capacity: Int) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0)
        self.capacity = capacity
        mask = capacity - 1
        words = reserve(UnsafeAtomic<UInt64>.Storage.self, capacity * SourceTable.wordsPerSlot)
        counters = reserve(UnsafeAtomic<UInt64>.Storage.self, Counter.allCases.count)
    }

    deinit {
        munmap(words, capacity * SourceTable.wordsPerSlot * MemoryLayout<UnsafeAtomic<UInt64>.Storage>.stride)
    }

    @inline(__always)
    func word(_ slot: Int, _ word: Word) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: words + (slot &* SourceTable.wordsPerSlot &+ word.rawValue))
    }

    public func count(_ counter: Counter) -> UInt64 {
        UnsafeAtomic<UInt64>(at: counters + counter.rawValue).load(ordering: .relaxed)
    }

    @inline(__always)
    private func bump(_ counter: Counter) {
        UnsafeAtomic<UInt64>(at: counters + counter.rawValue).wrappingIncrement(ordering: .relaxed)
    }

    /// Monotonic nanoseconds (`bpf_ktime_get_ns`'s clock).
    @inline(__always)
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// The slot of `key` (found, or claimed for it), and its tag; nil: untracked.
    public func slot(for key: SourceKey, now: UInt64) -> (slot: Int, tag: UInt64)? {
        let hash = key.hash
        let tag = (hash >> 24) | 1
        let start = Int(truncatingIfNeeded: hash) & mask
        for _ in 0..<4 {
            var reusable = -1
            var oldest = -1
            var oldestDue = UInt64.max
            for i in 0..<SourceTable.probe {
                let slot = (start &+ i) & mask
                let first = word(slot, .tagAndPlaces).load(ordering: .relaxed)
                if first >> SourceTable.placeBits == tag { return (slot, tag) }
                guard first & SourceTable.placeMask == 0 else { continue }
                if reusable < 0, first == 0 || isForgettable(slot, now: now) {
                    reusable = slot
                } else {
                    let due = max(word(slot, .connectionTAT).load(ordering: .relaxed), word(slot, .packetTAT).load(ordering: .relaxed))
                    if due < oldestDue { oldest = slot; oldestDue = due }
                }
            }
            let chosen = reusable >= 0 ? reusable : oldest
            guard chosen >= 0 else {
                bump(.untracked)
                return nil
            }
            let first = word(chosen, .tagAndPlaces).load(ordering: .relaxed)
            guard first & SourceTable.placeMask == 0,
                  word(chosen, .tagAndPlaces).compareExchange(expected: first, desired: tag << SourceTable.placeBits, ordering: .relaxed).exchanged
            else { continue }
            if first == 0 { bump(.tracked) } else if reusable < 0 { bump(.evictions) }
            word(chosen, .connectionTAT).store(0, ordering: .relaxed)
            word(chosen, .packetTAT).store(0, ordering: .relaxed)
            word(chosen, .limitedWindow).store(0, ordering: .relaxed)
            word(chosen, .limitedPrevious).store(0, ordering: .relaxed)
            word(chosen, .addressHigh).store(key.high, ordering: .relaxed)
            word(chosen, .addressLow).store(key.low, ordering: .relaxed)
            word(chosen, .meta).store(key.meta, ordering: .relaxed)
            return (chosen, tag)
        }
        bump(.untracked)
        return nil
    }

    /// Nothing would be lost by forgetting the slot: no connection, full buckets, nothing
    /// limited in the last two minutes.
    private func isForgettable(_ slot: Int, now: UInt64) -> Bool {
        guard word(slot, .connectionTAT).load(ordering: .relaxed) <= now, word(slot, .packetTAT).load(ordering: .relaxed) <= now else { return false }
        let window = word(slot, .limitedWindow).load(ordering: .relaxed)
        return window == 0 || (window >> 44) &+ 2 <= now / SourceTable.minuteNanoseconds
    }

    /// GCRA: takes one unit from the bucket `which` of `slot`; false: over the limit.
    @inline(__always)
    public func take(_ slot: Int, _ which: Word, interval: UInt64, tolerance: UInt64, now: UInt64) -> Bool {
        let bucket = word(slot, which)
        var due = bucket.load(ordering: .relaxed)
        while true {
            let next = max(due, now) &+ interval
            if next &- now > tolerance { return false }
            let (exchanged, original) = bucket.compareExchange(expected: due, desired: next, ordering: .relaxed)
            if exchanged { return true }
            due = original
        }
    }

    /// Takes one of the source's `maximum` connection places; false when it holds them all
    /// (or the slot went to another source meanwhile).
    @inline(__always)
    public func enter(_ slot: Int, tag: UInt64, maximum: Int) -> Bool {
        let first = word(slot, .tagAndPlaces)
        var value = first.load(ordering: .relaxed)
        while true {
            guard value >> SourceTable.placeBits == tag, value & SourceTable.placeMask < UInt64(min(maximum, Int(SourceTable.placeMask))) else { return false }
            let (exchanged, original) = first.compareExchange(expected: value, desired: value &+ 1, ordering: .relaxed)
            if exchanged { return true }
            value = original
        }
    }

    /// Gives back a place taken by `enter` (the slot cannot have changed hands meanwhile).
    @inline(__always)
    public func leave(_ slot: Int) {
        word(slot, .tagAndPlaces).wrappingDecrement(ordering: .relaxed)
    }

    /// Counts one limited connection or datagram, for `/ratelimit/top`.
    func noteLimited(_ slot: Int, reason: RateLimitReason, now: UInt64) {
        _ = word(slot, .meta).loadThenBitwiseOr(with: UInt64(1) << (56 + reason.rawValue), ordering: .relaxed)
        let minute = now / SourceTable.minuteNanoseconds
        let window = word(slot, .limitedWindow)
        var value = window.load(ordering: .relaxed)
        while true {
            if value >> 44 == minute {
                window.wrappingIncrement(ordering: .relaxed)
                return
            }
            let (exchanged, original) = window.compareExchange(expected: value, desired: minute << 44 | 1, ordering: .relaxed)
            if exchanged {
                let previous = value != 0 && value >> 44 &+ 1 == minute ? value & ((1 << 44) - 1) : 0
                word(slot, .limitedPrevious).store(previous, ordering: .relaxed)
                return
            }
            value = original
        }
    }

    /// A source limited lately, as `/ratelimit/top` lists it.
    struct LimitedSource {
        var key: SourceKey
        /// Limited in the last minute (the current minute's count, plus the previous
        /// minute's in proportion to how much of it the last 60 s still cover).
        var limited: UInt64
        var reasons: [RateLimitReason]
        var connections: Int
    }

    /// Every source limited in the last minute, most limited first (a scan of the table,
    /// for the admin API; never on the data path).
    func limitedSources(now: UInt64, top: Int) -> [LimitedSource] {
        let minute = now / SourceTable.minuteNanoseconds
        let elapsed = Double(now % SourceTable.minuteNanoseconds) / Double(SourceTable.minuteNanoseconds)
        var found: [LimitedSource] = []
        for slot in 0..<capacity {
            let first = word(slot, .tagAndPlaces).load(ordering: .relaxed)
            guard first != 0 else { continue }
            let window = word(slot, .limitedWindow).load(ordering: .relaxed)
            guard window != 0 else { continue }
            let count = window & ((1 << 44) - 1)
            let limited: Double
            if window >> 44 == minute {
                limited = Double(count) + Double(word(slot, .limitedPrevious).load(ordering: .relaxed)) * (1 - elapsed)
            } else if window >> 44 &+ 1 == minute {
                limited = Double(count) * (1 - elapsed)
            } else {
                continue
            }
            let meta = word(slot, .meta).load(ordering: .relaxed)
            let key = SourceKey(high: word(slot, .addressHigh).load(ordering: .relaxed), low: word(slot, .addressLow).load(ordering: .relaxed),
                                meta: meta & ((1 << 56) - 1))
            let reasons = RateLimitReason.allCases.filter { meta & (UInt64(1) << (56 + $0.rawValue)) != 0 }
            found.append(LimitedSource(key: key, limited: UInt64(limited.rounded(.up)), reasons: reasons,
                                       connections: Int(first & SourceTable.placeMask)))
        }
        found.sort { $0.limited > $1.limited }
        return Array(found.prefix(top))
    }
}

/// Why a connection or datagram was limited (also the `reason` label of the metrics).
public enum RateLimitReason: Int, CaseIterable, Sendable {
    case newConnections, packets, maxConnections

    public var name: String {
        switch self {
        case .newConnections: "new_connections"
        case .packets: "packets"
        case .maxConnections: "max_connections"
        }
    }
}
