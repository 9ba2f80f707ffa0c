/// A hashed timer wheel for idle timeouts: each connection sits in the bucket of its
/// deadline tick, linked through its slab record. Traffic only writes a timestamp; when a
/// bucket comes due, each connection in it is either expired or re-filed at its new
/// deadline. One kernel timer per worker drives it, never one per connection or per byte.
struct TimerWheel {
    static let bucketCount = 4096
    let heads: UnsafeMutablePointer<UInt32>
    /// The last tick whose bucket has been processed.
    var processedTick: UInt32

    init(now: UInt32) {
        heads = .allocate(capacity: TimerWheel.bucketCount)
        heads.initialize(repeating: 0, count: TimerWheel.bucketCount)
        processedTick = now
    }

    func deallocate() { heads.deallocate() }
    static func bucket(of tick: UInt32) -> UInt32 { tick & UInt32(bucketCount - 1) }

    /// Files `slot` under `deadline` (never earlier than the next tick).
    mutating func insert(_ slot: UInt32, deadline: UInt32, in slab: ConnectionSlab) {
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
    mutating func remove(_ slot: UInt32, in slab: ConnectionSlab) {
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
    mutating func takeNextDueBucket(now: UInt32) -> UInt32? {
        guard processedTick != now else { return nil }
        processedTick &+= 1
        let bucket = Int(TimerWheel.bucket(of: processedTick))
        let head = heads[bucket]
        heads[bucket] = 0
        return head
    }
}
