/// A fixed-capacity table of connection records addressed by index. Slots are handed out
/// from a free list (most recently freed first, so memory stays warm) and, until the
/// first use of each, from a high-water mark: untouched slots cost no resident memory.
///
/// Invariants: `active` slots are handed out and not released; a slot is in the free list
/// at most once; `release` resets the record and moves its generation on (24 bits, the
/// width user data carries), so a completion naming the slot's earlier connection is told
/// apart.
public struct ConnectionSlab {
    let records: UnsafeMutablePointer<Connection>
    let freeList: UnsafeMutablePointer<UInt32>
    var freeCount = 0
    public private(set) var highWater = 0
    public let capacity: Int
    public private(set) var active = 0

    public init(capacity: Int) {
        self.capacity = capacity
        records = .allocate(capacity: capacity)
        freeList = .allocate(capacity: capacity)
    }

    public func deallocate() {
        records.deallocate()
        freeList.deallocate()
    }

    /// A free slot, or nil when all `capacity` are in use.
    public mutating func allocate() -> UInt32? {
        let index: UInt32
        if freeCount > 0 {
            freeCount -= 1
            index = freeList[freeCount]
        } else if highWater < capacity {
            index = UInt32(highWater)
            (records + highWater).initialize(to: Connection())
            highWater += 1
        } else {
            return nil
        }
        active += 1
        return index
    }
    /// Gives `index` back; it must be handed out.
    public mutating func release(_ index: UInt32) {
        let record = records + Int(index)
        let generation = record.pointee.generation &+ 1
        record.pointee = Connection()
        record.pointee.generation = generation & 0xFF_FFFF
        freeList[freeCount] = index
        freeCount += 1
        active -= 1
    }
    subscript(index: UInt32) -> UnsafeMutablePointer<Connection> { records + Int(index) }

    /// The generation of the connection in `index` (what its requests' user data carry).
    public func generation(_ index: UInt32) -> UInt32 { records[Int(index)].generation }
}
