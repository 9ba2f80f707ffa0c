/// Streams whose receive found the buffer ring empty (`ENOBUFS`), in arrival order. They
/// are re-armed as buffers come back, so running out of buffers slows connections down
/// instead of failing them. Each stream is queued at most once, so twice the slab's
/// capacity always suffices.
struct BufferWaitQueue {
    let entries: UnsafeMutablePointer<UInt64>
    let mask: Int
    var head = 0
    var tail = 0

    init(capacity: Int) {
        var size = 1
        while size < capacity { size <<= 1 }
        entries = .allocate(capacity: size)
        mask = size - 1
    }

    func deallocate() { entries.deallocate() }

    var count: Int { tail &- head }

    /// `userData` is the receive request to re-issue.
    mutating func push(_ userData: UInt64) {
        entries[tail & mask] = userData
        tail &+= 1
    }
    mutating func pop() -> UInt64? {
        guard head != tail else { return nil }
        let value = entries[head & mask]
        head &+= 1
        return value
    }
}
