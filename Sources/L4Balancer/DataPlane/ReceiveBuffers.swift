import URing

/// The worker's TCP receive buffers in two sizes, and the connections waiting for them.
///
/// A direction starts with small buffers (request/response traffic stays cache-friendly)
/// and moves to large ones once a read fills a small buffer (bulk transfers: fewer, bigger
/// reads and sends).
///
/// Invariants:
/// - A buffer a completion names is the worker's until `recycle`d; `handedOut` is called
///   once for each, so `inUse` counts exactly the buffers held by connections.
/// - A direction is in `waiters` exactly while its stream is `.waitingForBuffer`;
///   closing removes its entries.
/// - `smallPeak` and `largePeak` only grow; they are published when passed.
struct ReceiveBuffers: ~Copyable {
    var small: ProvidedBufferRing
    var large: ProvidedBufferRing
    /// Whether small receives are multishot with a total limit (Linux 6.16); without it
    /// they are single-shot, which keeps the same per-direction bound.
    let multishotSmallReceives: Bool
    var waiters: BufferWaitQueue
    /// Connections whose next step found no free small buffer (`retryAtTick`).
    var retriesAtTick: [(slot: UInt32, generation: UInt32)] = []
    /// TLS sides whose input BIO a large read drained (`releaseIdleInputMemory`).
    var inputReleasesAtTick: [(slot: UInt32, generation: UInt32, atUpstream: Bool)] = []
    var smallPeak = 0
    var largePeak = 0

    init(ring: borrowing Ring, options: Worker.Options, slots: Int) throws {
        let buffers = options.buffers
        let small = try ProvidedBufferRing(
            ring: ring, group: Worker.smallBufferGroup, count: buffers.small, bufferSize: buffers.smallSize,
            window: Worker.Options.window(for: buffers.small, cap: options.smallBufferWindow),
            // For TLS: ciphertext to clients, PROXY v2 headers with TLVs, plaintext read
            // ahead (`take`); the kernel's ring never holds these.
            reserve: min(256, max(4, buffers.small / 16)))
        let large: ProvidedBufferRing
        do {
            large = try ProvidedBufferRing(
                ring: ring, group: Worker.largeBufferGroup, count: buffers.large, bufferSize: buffers.largeSize,
                window: Worker.Options.window(for: buffers.large, cap: 32768),
                // Plaintext read from a TLS side starts here, behind the ciphertext (Worker+TLS).
                headroom: Worker.plaintextHeadroom)
        } catch {
            small.unregister(from: ring)
            throw error
        }
        self.small = small
        self.large = large
        multishotSmallReceives = ring.capabilities.multishotReceiveLimit
        waiters = BufferWaitQueue(slots: slots)
    }

    @inline(__always)
    mutating func recycle(_ buffer: UInt16, large isLarge: Bool) {
        if isLarge { large.recycle(buffer) } else { small.recycle(buffer) }
    }

    @inline(__always)
    mutating func handedOut(large isLarge: Bool) {
        if isLarge { large.handedOut() } else { small.handedOut() }
    }

    @inline(__always)
    func address(_ buffer: UInt16, large isLarge: Bool) -> UnsafeMutableRawPointer {
        isLarge ? large.address(of: buffer) : small.address(of: buffer)
    }

    /// Records a new peak of either size; true when one was passed (to publish).
    @inline(__always)
    mutating func notePeaks() -> Bool {
        var passed = false
        if small.inUse > smallPeak { smallPeak = small.inUse; passed = true }
        if large.inUse > largePeak { largePeak = large.inUse; passed = true }
        return passed
    }

    /// Must run while the ring is alive.
    mutating func deallocate(ring: borrowing Ring) {
        small.unregister(from: ring)
        large.unregister(from: ring)
        waiters.deallocate()
    }
}
