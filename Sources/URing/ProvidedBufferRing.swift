import CURing

#if canImport(Glibc)
import Glibc
#endif

/// A ring of equally sized buffers the kernel picks from when a buffer-select receive
/// completes. Memory is mapped once; only buffers that have carried bytes become resident.
/// A buffer handed out by a completion is given back with `recycle` and becomes visible
/// to the kernel at the next `publish`.
public struct ProvidedBufferRing: ~Copyable {
    @usableFromInline let ring: UnsafeMutablePointer<io_uring>
    @usableFromInline let bufferRing: UnsafeMutablePointer<io_uring_buf_ring>
    @usableFromInline let memory: UnsafeMutableRawPointer
    public let group: UInt16
    public let count: Int
    public let bufferSize: Int
    @usableFromInline let mask: Int32
    @usableFromInline var pendingCount: Int32 = 0

    /// `count` must be a power of two, at most 32768.
    public init(ring: borrowing Ring, group: UInt16, count: Int, bufferSize: Int) throws(Errno) {
        precondition(count > 0 && count & (count - 1) == 0 && count <= 32768, "buffer count must be a power of two ≤ 32768")
        var err: Int32 = 0
        guard let bufferRing = CURing_setup_buf_ring(ring.ring, UInt32(count), group, &err) else {
            throw Errno(rawValue: err)
        }
        let bytes = count * bufferSize
        let memory = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0)
        guard let memory, memory != MAP_FAILED else {
            let error = Errno.current
            CURing_free_buf_ring(ring.ring, bufferRing, UInt32(count), group)
            throw error
        }
        self.ring = ring.ring
        self.bufferRing = bufferRing
        self.memory = memory
        self.group = group
        self.count = count
        self.bufferSize = bufferSize
        self.mask = io_uring_buf_ring_mask(UInt32(count))
        for id in 0..<count {
            io_uring_buf_ring_add(bufferRing, memory + id * bufferSize, UInt32(bufferSize), UInt16(id), mask, Int32(id))
        }
        io_uring_buf_ring_advance(bufferRing, Int32(count))
    }

    deinit {
        CURing_free_buf_ring(ring, bufferRing, UInt32(count), group)
        munmap(memory, count * bufferSize)
    }

    /// The bytes of buffer `id`.
    @inlinable
    public func address(of id: UInt16) -> UnsafeMutableRawPointer {
        memory + Int(id) * bufferSize
    }

    /// Hands buffer `id` back; the kernel sees it after `publish()`.
    @inlinable
    public mutating func recycle(_ id: UInt16) {
        io_uring_buf_ring_add(bufferRing, address(of: id), UInt32(bufferSize), id, mask, pendingCount)
        pendingCount += 1
    }

    /// Makes recycled buffers visible to the kernel. Returns how many were published.
    @inlinable
    @discardableResult
    public mutating func publish() -> Int {
        let published = Int(pendingCount)
        if pendingCount > 0 {
            io_uring_buf_ring_advance(bufferRing, pendingCount)
            pendingCount = 0
        }
        return published
    }
}
