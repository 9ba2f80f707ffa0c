import CLinux
import Logging
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The provided-buffer rings on the worker's side: recycling buffers, their addresses, and
/// which socket and direction a stream reads from and writes to.
extension Worker {
    @inline(__always)
    func recycle(_ buffer: UInt16, large: Bool) {
        buffers.recycle(buffer, large: large)
    }

    /// A completion named a buffer of this group: it is ours until recycled.
    @inline(__always)
    func handedOut(large: Bool) {
        buffers.handedOut(large: large)
    }

    @inline(__always)
    func bufferAddress(_ buffer: UInt16, large: Bool) -> UnsafeMutableRawPointer {
        buffers.address(buffer, large: large)
    }

    /// Publishes recycled buffers, then re-arms as many waiting receives as there are free
    /// small buffers: connections that are moving first (`BufferWaitQueue`).
    @inline(__always)
    func returnBuffers() {
        buffers.small.publish()
        buffers.large.publish()
        datagrams.buffers.publish()
        if datagrams.receivesWaiting, datagrams.buffers.available > 0 { rearmDatagramReceives() }
        if buffers.waiters.count > 0 {
            // Each waiting direction at most once per pass: one whose re-arm fails goes
            // back to the end of the queue.
            var budget = min(buffers.small.available, buffers.waiters.count)
            while budget > 0, let entry = buffers.waiters.pop() {
                let slot = entry / 2
                let toUpstream = entry & 1 == 0
                let record = slab[slot]
                // Only relaying (or TLS-handshaking) connections wait; closing removes their entries.
                assert((record.pointee.state == .proxying || record.pointee.state == .handshaking || record.pointee.state == .upstreamHandshaking) && stream(record, toUpstream: toUpstream).pointee.state == .waitingForBuffer)
                armReceive(slot, record, toUpstream: toUpstream)
                budget -= 1
            }
        }
        // The most buffers in use at once: a shared store only when a peak is passed.
        if buffers.notePeaks() {
            stats.set(.smallBuffersPeak, UInt64(buffers.smallPeak))
            stats.set(.largeBuffersPeak, UInt64(buffers.largePeak))
        }
    }

    @inline(__always)
    func stream(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> UnsafeMutablePointer<Connection.Stream> {
        (UnsafeMutableRawPointer(record) + (toUpstream ? Worker.toUpstreamOffset : Worker.toClientOffset))
            .assumingMemoryBound(to: Connection.Stream.self)
    }

    /// The socket a direction reads from: the client's for bytes going upstream.
    @inline(__always)
    func source(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> Int32 {
        toUpstream ? record.pointee.client : record.pointee.upstream
    }

    /// The socket a direction writes to (and half-closes).
    @inline(__always)
    func destination(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> Int32 {
        toUpstream ? record.pointee.upstream : record.pointee.client
    }
}
