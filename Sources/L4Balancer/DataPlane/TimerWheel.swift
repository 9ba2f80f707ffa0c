/// A hashed timer wheel for idle timeouts: each connection sits in the bucket of its
/// deadline tick, linked through its slab record. Traffic only writes a timestamp; when a
/// bucket comes due, each connection in it is either expired or re-filed at its new
/// deadline. One kernel timer per worker drives it, never one per connection or per byte.
///
/// Invariants: a slot is in at most one bucket (`timerBucket`, `UInt32.max` for none),
/// linked both ways through `timerPrevious`/`timerNext` (slot + 1; 0 ends the list);
/// `heads[b]` is the first slot + 1 of bucket `b`. A deadline more than `bucketCount`
/// ticks ahead comes due early, in the bucket of its deadline's low bits: the owner
/// checks each due slot's real deadline and files it again.
public struct TimerWheel {
    public static let bucketCount = 4096
    let heads: UnsafeMutablePointer<UInt32>
    /// The last tick whose bucket has been processed.
    public private(set) var processedTick: UInt32

    public init(now: UInt32) {
        heads = .allocate(capacity: TimerWheel.bucketCount)
        heads.initialize(repeating: 0, count: TimerWheel.bucketCount)
        processedTick = now
    }

    public func deallocate() { heads.deallocate() }
    static func bucket(of tick: UInt32) -> UInt32 { tick & UInt32(bucketCount - 1) }

    /// Files `slot` under `deadline` (never earlier than the next tick).
    public mutating func insert(_ slot: UInt32, deadline: UInt32, in slab: ConnectionSlab) {
        let due = max(deadline, processedTick &+ 1)
        let bucket = TimerWheel.bucket(of: due)
        let record = slab[slot]
        let head = heads[Int(bucket)]
        record.pointee.timerBucket = bucket
        record.pointee.timerPrevious = 0
        record.pointee.timerNext = head
        if head != 0 { slab[head - 1].pointee.timerPrevious = slot + 1 }
        heads[Int(bucket)] = slot + 1
    }
    /// Takes `slot` out of its bucket; nothing when it is in none.
    public mutating func remove(_ slot: UInt32, in slab: ConnectionSlab) {
        let record = slab[slot]
        let bucket = record.pointee.timerBucket
        guard bucket != UInt32.max else { return }
        let previous = record.pointee.timerPrevious
        let next = record.pointee.timerNext
        if previous != 0 { slab[previous - 1].pointee.timerNext = next } else { heads[Int(bucket)] = next }
        if next != 0 { slab[next - 1].pointee.timerPrevious = previous }
        record.pointee.timerBucket = UInt32.max
        record.pointee.timerPrevious = 0
        record.pointee.timerNext = 0
    }

    /// Detaches the next due bucket's list (advancing `processedTick` by one) and returns
    /// its first slot + 1 (0 when empty); nil when `now` has been reached.
    public mutating func takeNextDueBucket(now: UInt32) -> UInt32? {
        guard processedTick != now else { return nil }
        processedTick &+= 1
        let bucket = Int(TimerWheel.bucket(of: processedTick))
        let head = heads[bucket]
        heads[bucket] = 0
        return head
    }

    /// The next slot of a detached bucket's list (`cursor`: from `takeNextDueBucket`, then
    /// as this leaves it), unlinked and in no bucket; nil at the end of the list.
    @inline(__always)
    public func next(_ cursor: inout UInt32, in slab: ConnectionSlab) -> UInt32? {
        guard cursor != 0 else { return nil }
        let slot = cursor - 1
        let record = slab[slot]
        cursor = record.pointee.timerNext
        record.pointee.timerBucket = UInt32.max
        record.pointee.timerPrevious = 0
        record.pointee.timerNext = 0
        return slot
    }

    /// Whether `slot` is filed in a bucket.
    public func isFiled(_ slot: UInt32, in slab: ConnectionSlab) -> Bool {
        slab[slot].pointee.timerBucket != UInt32.max
    }
}
