#if canImport(Glibc)
import Glibc
#endif

/// Per connection slot, what only some connections need, kept beside `Connection` so the
/// record stays one cache line: one column per feature, each reserved for every slot but
/// touched only by connections that use the feature (unused pages cost no resident
/// memory).
///
/// Invariants:
/// - An entry is written only by the connection holding its slot, and read only while
///   it does; a new connection in the slot starts each entry it uses afresh.
/// - `tls` belongs to slots whose connection terminates TLS (`Connection.tls`),
///   `upstreamTLS` to those with TLS to the endpoint (`Connection.upstreamTLS`).
/// - `sourcePlaces[slot]` is the source-table slot + 1 of a connection holding a
///   `rate_limit` `max_connections` place, 0 for none.
/// - `tried(slot)` holds `Connection.triedAbove64` entries: endpoints at index 64 and
///   above already tried (one per attempt), then the current choice's skips.
/// - `proxyHeader(slot)` holds the PROXY header while its send is in flight.
/// - `access` exists only while the access log is on.
struct SlotSideTables {
    let capacity: Int
    let tls: UnsafeMutablePointer<TLSSlot>
    let upstreamTLS: UnsafeMutablePointer<TLSSlot>
    let sourcePlaces: UnsafeMutablePointer<UInt32>
    private let triedAbove64: UnsafeMutablePointer<UInt16>
    private let proxyHeaders: UnsafeMutableRawPointer
    let access: UnsafeMutablePointer<AccessSlot>?

    init(capacity: Int, accessLog: Bool) {
        self.capacity = capacity
        tls = reserve(TLSSlot.self, capacity)
        upstreamTLS = reserve(TLSSlot.self, capacity)
        sourcePlaces = reserve(UInt32.self, capacity)
        triedAbove64 = reserve(UInt16.self, capacity * Worker.triedStride)
        proxyHeaders = UnsafeMutableRawPointer(reserve(UInt8.self, capacity * ProxyProtocolHeader.capacity))
        access = accessLog ? reserve(AccessSlot.self, capacity) : nil
    }

    @inline(__always)
    func tried(_ slot: UInt32) -> UnsafeMutablePointer<UInt16> {
        triedAbove64 + Int(slot) * Worker.triedStride
    }

    @inline(__always)
    func proxyHeader(_ slot: UInt32) -> UnsafeMutableRawPointer {
        proxyHeaders + Int(slot) * ProxyProtocolHeader.capacity
    }

    func deallocate() {
        munmap(tls, capacity * MemoryLayout<TLSSlot>.stride)
        munmap(upstreamTLS, capacity * MemoryLayout<TLSSlot>.stride)
        munmap(sourcePlaces, capacity * MemoryLayout<UInt32>.stride)
        munmap(triedAbove64, capacity * Worker.triedStride * MemoryLayout<UInt16>.stride)
        munmap(proxyHeaders, capacity * ProxyProtocolHeader.capacity)
        if let access { munmap(access, capacity * MemoryLayout<AccessSlot>.stride) }
    }
}
