#if canImport(Glibc)
import Glibc
#endif

/// Directions whose receive found no buffer (`ENOBUFS`), re-armed as buffers come back, so
/// running out of buffers slows connections down instead of failing them. Two queues, each
/// in arrival order: `.first` for connections that are moving (or brand new), `.later` for
/// connections whose other direction is stuck on a peer that is not reading — when the
/// pool runs low, those wait until everyone else has been served.
///
/// The queues are linked through per-entry arrays (an entry is a slot's direction), so an
/// entry is in at most one queue at most once, `remove` takes it out when its connection
/// closes, and a reused slot can never meet a stale entry. Nothing is allocated after init;
/// capacity is exact (one place per direction of every slot), so the queue cannot overflow.
public struct BufferWaitQueue {
    public enum Priority: UInt8 { case first = 0, later = 1 }
    static let none = UInt32.max

    let next: UnsafeMutablePointer<UInt32>
    let previous: UnsafeMutablePointer<UInt32>
    let queueOf: UnsafeMutablePointer<UInt8>
    let capacity: Int
    var heads: (UInt32, UInt32) = (BufferWaitQueue.none, BufferWaitQueue.none)
    var tails: (UInt32, UInt32) = (BufferWaitQueue.none, BufferWaitQueue.none)
    public private(set) var count = 0

    /// Room for `slots` connections (two entries each). Reserved, not touched: only the
    /// entries of slots that ever waited become resident.
    public init(slots: Int) {
        capacity = 2 * slots
        // Fresh anonymous pages read as 0; 0 in `queueOf` means "not queued".
        next = reserve(UInt32.self, capacity)
        previous = reserve(UInt32.self, capacity)
        queueOf = reserve(UInt8.self, capacity)
    }

    public func deallocate() {
        munmap(next, max(capacity * 4, 1))
        munmap(previous, max(capacity * 4, 1))
        munmap(queueOf, max(capacity, 1))
    }

    /// The entry of one direction of a slot.
    @inline(__always)
    public static func entry(slot: UInt32, toUpstream: Bool) -> UInt32 { slot &* 2 &+ (toUpstream ? 0 : 1) }

    @inline(__always)
    public func contains(_ entry: UInt32) -> Bool { queueOf[Int(entry)] != 0 }

    /// Queues `entry` at the back of `priority`'s queue; an entry already queued stays
    /// where it is.
    public mutating func push(_ entry: UInt32, priority: Priority) {
        guard !contains(entry) else { return }
        let q = Int(priority.rawValue)
        queueOf[Int(entry)] = UInt8(q + 1)
        next[Int(entry)] = BufferWaitQueue.none
        let tail = q == 0 ? tails.0 : tails.1
        previous[Int(entry)] = tail
        if tail == BufferWaitQueue.none { setHead(q, entry) } else { next[Int(tail)] = entry }
        setTail(q, entry)
        count += 1
    }

    /// Takes `entry` out of whichever queue holds it (no-op when it is not queued).
    public mutating func remove(_ entry: UInt32) {
        let marker = queueOf[Int(entry)]
        guard marker != 0 else { return }
        let q = Int(marker) - 1
        let before = previous[Int(entry)]
        let after = next[Int(entry)]
        if before == BufferWaitQueue.none { setHead(q, after) } else { next[Int(before)] = after }
        if after == BufferWaitQueue.none { setTail(q, before) } else { previous[Int(after)] = before }
        queueOf[Int(entry)] = 0
        count -= 1
    }

    /// The oldest entry of the first queue, else of the later one.
    public mutating func pop() -> UInt32? {
        let head = heads.0 != BufferWaitQueue.none ? heads.0 : heads.1
        guard head != BufferWaitQueue.none else { return nil }
        remove(head)
        return head
    }

    @inline(__always)
    mutating func setHead(_ q: Int, _ value: UInt32) { if q == 0 { heads.0 = value } else { heads.1 = value } }
    @inline(__always)
    mutating func setTail(_ q: Int, _ value: UInt32) { if q == 0 { tails.0 = value } else { tails.1 = value } }
}
