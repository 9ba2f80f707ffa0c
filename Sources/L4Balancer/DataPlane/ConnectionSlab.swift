/// A fixed-capacity table of connection records addressed by index. Slots are handed out
/// from a free list (most recently freed first, so memory stays warm) and, until the
/// first use of each, from a high-water mark: untouched slots cost no resident memory.
struct ConnectionSlab {
    let records: UnsafeMutablePointer<Connection>
    let freeList: UnsafeMutablePointer<UInt32>
    var freeCount = 0
    var highWater = 0
    let capacity: Int
    var active = 0

    init(capacity: Int) {
        self.capacity = capacity
        records = .allocate(capacity: capacity)
        freeList = .allocate(capacity: capacity)
    }

    func deallocate() {
        records.deallocate()
        freeList.deallocate()
    }

    /// A free slot, or nil when all `capacity` are in use.
    mutating func allocate() -> UInt32? {
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
    mutating func release(_ index: UInt32) {
        let record = records + Int(index)
        let generation = record.pointee.generation &+ 1
        record.pointee = Connection()
        record.pointee.generation = generation & 0xFF_FFFF
        freeList[freeCount] = index
        freeCount += 1
        active -= 1
    }
    subscript(index: UInt32) -> UnsafeMutablePointer<Connection> { records + Int(index) }
}
