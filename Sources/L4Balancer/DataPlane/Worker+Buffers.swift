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
        if large { largeBuffers.recycle(buffer) } else { smallBuffers.recycle(buffer) }
    }

    /// A completion named a buffer of this group: it is ours until recycled.
    @inline(__always)
    func handedOut(large: Bool) {
        if large { largeBuffers.handedOut() } else { smallBuffers.handedOut() }
    }

    @inline(__always)
    func bufferAddress(_ buffer: UInt16, large: Bool) -> UnsafeMutableRawPointer {
        large ? largeBuffers.address(of: buffer) : smallBuffers.address(of: buffer)
    }

    /// Publishes recycled buffers, then re-arms as many waiting receives as there are free
    /// small buffers: connections that are moving first (`BufferWaitQueue`).
    @inline(__always)
    func returnBuffers() {
        smallBuffers.publish()
        largeBuffers.publish()
        datagramBuffers.publish()
        if datagramReceivesWaiting, datagramBuffers.available > 0 { rearmDatagramReceives() }
        if waiters.count > 0 {
            // Each waiting direction at most once per pass: one whose re-arm fails goes
            // back to the end of the queue.
            var budget = min(smallBuffers.available, waiters.count)
            while budget > 0, let entry = waiters.pop() {
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
        if smallBuffers.inUse > smallBuffersPeak {
            smallBuffersPeak = smallBuffers.inUse
            stats.set(.smallBuffersPeak, UInt64(smallBuffersPeak))
        }
        if largeBuffers.inUse > largeBuffersPeak {
            largeBuffersPeak = largeBuffers.inUse
            stats.set(.largeBuffersPeak, UInt64(largeBuffersPeak))
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
