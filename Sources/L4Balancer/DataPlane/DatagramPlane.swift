import CLinux
import URing

#if canImport(Glibc)
import Glibc
#endif

/// The worker's UDP side: datagram buffers, the message headers the kernel reads and
/// writes, the sessions, and the sessions the kernel relays.
///
/// Invariants:
/// - A datagram buffer is held only while its datagram is in flight (a send upstream or
///   a reply to the client); reply `i`'s header, name, vector and control space belong to
///   buffer `i` and are written only while it is held.
/// - `header` is shared by every UDP listener's multishot recvmsg: the kernel reads its
///   name and control lengths, never writes it.
/// - `receivesWaiting` is true while some listener's receive stopped for want of a buffer;
///   it is re-armed as soon as one is free.
/// - A session in `relayed` has its flows in the kernel's relay (`UDPSessionTable`'s
///   `relayed` flag says the same); ending the session removes both.
/// - A descriptor in `upstreamsToClose` is closed only after the batch that may still
///   send on it has been submitted.
struct DatagramPlane: ~Copyable {
    var buffers: ProvidedBufferRing
    let header: UnsafeMutablePointer<msghdr>
    let replies: UnsafeMutablePointer<msghdr>
    let replyNames: UnsafeMutablePointer<sockaddr_in6>
    let replyVectors: UnsafeMutablePointer<iovec>
    /// Per buffer: a reply's IP_PKTINFO, for listeners bound to a wildcard address.
    let replyControls: UnsafeMutableRawPointer
    var sessions = UDPSessionTable(listeners: IdentityRegistry.listenerCapacity)
    var repliesToRearm: [UInt32] = []
    var receivesWaiting = false
    var upstreamsToClose: [Int32] = []
    /// `relay: kernel`: sessions the kernel carries, by slot; when their counts were last
    /// folded, and which share of them the next fold takes.
    var relayed: [UInt32: RelayedSession] = [:]
    var lastRelayFoldTick: UInt32 = 0
    var relayFoldPhase: UInt32 = 0
    var relayFoldSlots: [UInt32] = []

    init(ring: borrowing Ring) throws {
        let count = Worker.datagramBufferCount
        buffers = try ProvidedBufferRing(
            ring: ring, group: Worker.datagramBufferGroup, count: count, bufferSize: Worker.datagramBufferSize)
        header = .allocate(capacity: 1)
        header.initialize(to: msghdr())
        header.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
        // Room for IP_PKTINFO / IPV6_PKTINFO (only wildcard-bound listeners ask for it).
        header.pointee.msg_controllen = Worker.datagramControlLength
        replies = .allocate(capacity: count)
        replies.initialize(repeating: msghdr(), count: count)
        replyNames = .allocate(capacity: count)
        replyNames.initialize(repeating: sockaddr_in6(), count: count)
        replyVectors = .allocate(capacity: count)
        replyVectors.initialize(repeating: iovec(), count: count)
        replyControls = .allocate(byteCount: count * PacketDestination.controlSpace, alignment: 8)
    }

    /// Must run while the ring is alive.
    mutating func deallocate(ring: borrowing Ring) {
        buffers.unregister(from: ring)
        header.deallocate()
        replies.deallocate()
        replyNames.deallocate()
        replyVectors.deallocate()
        replyControls.deallocate()
    }
}
