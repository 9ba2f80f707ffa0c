import CURing

#if canImport(Glibc)
import Glibc
#endif

/// A pool of equally sized buffers the kernel picks from when a buffer-select receive
/// completes. The kernel's ring holds at most `window` of them at a time; the rest wait in
/// a last-in-first-out stack, so the buffers that carry traffic are the recently used,
/// cache-warm ones, and memory becomes resident only for as many buffers as were ever in
/// use at once plus the window, however large `count` is.
///
/// A buffer named by a completion is reported with `handedOut()`, given back with
/// `recycle`, and offered to the kernel again at the next `publish`. The owner must call
/// `unregister(from:)` before the ring itself is torn down.
public struct ProvidedBufferRing: ~Copyable {
    @usableFromInline let bufferRing: UnsafeMutablePointer<io_uring_buf_ring>
    @usableFromInline let memory: UnsafeMutableRawPointer
    /// Buffers not in use and not in the kernel's ring, most recently returned last.
    @usableFromInline let freeStack: UnsafeMutablePointer<UInt16>
    public let group: UInt16
    public let count: Int
    public let window: Int
    public let bufferSize: Int
    /// Bytes before each buffer that are the owner's alone: the kernel never writes them.
    public let headroom: Int
    @usableFromInline let stride: Int
    @usableFromInline let mask: Int32
    @usableFromInline var freeCount: Int
    /// Buffers in the kernel's ring that no completion has named yet.
    @usableFromInline var inKernel = 0
    /// Free buffers `publish` leaves out of the kernel's ring, for `take`.
    public let reserve: Int

    /// `count` buffers of `bufferSize` bytes, at most `window` (a power of two ≤ 32768) in
    /// the kernel's ring at once; `count` ≤ 65536. `reserve` free buffers are kept out of
    /// the kernel's ring for the owner to `take` (bytes it makes itself, not a receive's).
    /// Each buffer has `headroom` bytes before it, for the owner to write in front of what a
    /// receive put there.
    public init(ring: borrowing Ring, group: UInt16, count: Int, bufferSize: Int, window: Int? = nil, reserve: Int = 0,
                headroom: Int = 0) throws(Errno) {
        self.reserve = min(max(0, reserve), count - 1)
        let window = min(window ?? count, count)
        precondition(window > 0 && window & (window - 1) == 0 && window <= 32768, "buffer window must be a power of two ≤ 32768")
        precondition(count <= 65536, "at most 65536 buffers: their ids are 16 bits")
        var err: Int32 = 0
        guard let bufferRing = CURing_setup_buf_ring(ring.ring, UInt32(window), group, &err) else {
            throw Errno(rawValue: err)
        }
        let bytes = count * (headroom + bufferSize)
        let memory = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE | MAP_NORESERVE, -1, 0)
        guard let memory, memory != MAP_FAILED else {
            let error = Errno.current
            CURing_free_buf_ring(ring.ring, bufferRing, UInt32(window), group)
            throw error
        }
        self.bufferRing = bufferRing
        self.memory = memory
        self.group = group
        self.count = count
        self.window = window
        self.bufferSize = bufferSize
        self.headroom = headroom
        self.stride = headroom + bufferSize
        self.mask = io_uring_buf_ring_mask(UInt32(window))
        freeStack = .allocate(capacity: count)
        // Lowest ids on top: they are handed out first and stay the warm ones.
        for i in 0..<count { freeStack[i] = UInt16(truncatingIfNeeded: count - 1 - i) }
        freeCount = count
        publish()
    }

    /// Unregisters the group from `ring` and frees the memory. Call it once, while the ring
    /// is still alive.
    public func unregister(from ring: borrowing Ring) {
        CURing_free_buf_ring(ring.ring, bufferRing, UInt32(window), group)
        munmap(memory, count * stride)
        freeStack.deallocate()
    }

    /// The bytes of buffer `id` (its headroom is the `headroom` bytes before).
    @inlinable
    public func address(of id: UInt16) -> UnsafeMutableRawPointer {
        memory + Int(id) * stride + headroom
    }

    /// Buffers free to be handed out: in the kernel's ring or waiting to be published.
    @inlinable
    public var available: Int { freeCount + inKernel }

    /// Buffers the kernel has handed out that have not been recycled.
    @inlinable
    public var inUse: Int { count - available }

    /// A completion named one of this group's buffers.
    @inlinable
    public mutating func handedOut() {
        inKernel -= 1
    }

    /// A buffer for the owner to fill itself (bytes it produces, not a receive's), taken
    /// from those waiting outside the kernel's ring; nil when none is. Given back with
    /// `recycle` like any other.
    @inlinable
    public mutating func take() -> UInt16? {
        guard freeCount > 0 else { return nil }
        freeCount -= 1
        return freeStack[freeCount]
    }

    /// Hands buffer `id` back; the kernel may see it after `publish()`.
    @inlinable
    public mutating func recycle(_ id: UInt16) {
        freeStack[freeCount] = id
        freeCount += 1
    }

    /// Tops the kernel's ring up to `window` buffers from the free stack. Returns how many
    /// were added.
    @inlinable
    @discardableResult
    public mutating func publish() -> Int {
        var added: Int32 = 0
        while inKernel < window, freeCount > reserve {
            freeCount -= 1
            let id = freeStack[freeCount]
            io_uring_buf_ring_add(bufferRing, address(of: id), UInt32(bufferSize), id, mask, added)
            added += 1
            inKernel += 1
        }
        if added > 0 { io_uring_buf_ring_advance(bufferRing, added) }
        return Int(added)
    }
}
