import Atomics
import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// The blocklist as the workers enforce it in user space (where XDP is not attached): the
/// same verdicts as bpf/xdp_filter.bpf.c, taken once per accepted connection, before any
/// byte reaches an upstream. Immutable; the control plane publishes a new one through
/// `FilterStore` when the lists change. Prefixes are grouped by length, so a lookup is
/// one hash probe per distinct length in use (at most 33 for IPv4, 129 for IPv6).
final class SourceFilter: AtomicReference, @unchecked Sendable {
    /// False when XDP enforces the lists (or they are empty): accepts skip the check.
    let enforcing: Bool
    private let blockedV4: [(length: Int, addresses: Set<UInt32>)]
    private let allowedV4: [(length: Int, addresses: Set<UInt32>)]
    private let blockedV6: [(length: Int, addresses: Set<V6>)]
    private let allowedV6: [(length: Int, addresses: Set<V6>)]
    private let tcpPorts: Set<UInt16>
    private let udpPorts: Set<UInt16>

    struct V6: Hashable {
        var high: UInt64
        var low: UInt64

        func masked(_ length: Int) -> V6 {
            func mask(_ bits: Int) -> UInt64 { bits <= 0 ? 0 : bits >= 64 ? ~0 : ~0 << (64 - bits) }
            return V6(high: high & mask(length), low: low & mask(length - 64))
        }
    }

    static let disabled = SourceFilter(enforcing: false, blocked: [], allowed: [])

    init(enforcing: Bool, blocked: [FilterEntry], allowed: [SourcePrefix]) {
        func v4(_ prefixes: [SourcePrefix]) -> [(length: Int, addresses: Set<UInt32>)] {
            Dictionary(grouping: prefixes.filter { $0.family == .v4 }, by: \.length)
                .map { length, group in (length, Set(group.map { SourceFilter.v4Key($0.bytes) })) }
                .sorted { $0.length > $1.length }
        }
        func v6(_ prefixes: [SourcePrefix]) -> [(length: Int, addresses: Set<V6>)] {
            Dictionary(grouping: prefixes.filter { $0.family == .v6 }, by: \.length)
                .map { length, group in (length, Set(group.map { SourceFilter.v6Key($0.bytes) })) }
                .sorted { $0.length > $1.length }
        }
        var sources: [SourcePrefix] = []
        var tcp = Set<UInt16>(), udp = Set<UInt16>()
        for entry in blocked {
            switch entry {
            case .source(let prefix): sources.append(prefix)
            case .port(let rule): if rule.transport == .tcp { tcp.insert(rule.port) } else { udp.insert(rule.port) }
            }
        }
        self.enforcing = enforcing && !blocked.isEmpty
        blockedV4 = v4(sources)
        blockedV6 = v6(sources)
        allowedV4 = v4(allowed)
        allowedV6 = v6(allowed)
        tcpPorts = tcp
        udpPorts = udp
    }

    /// The verdict for a connection accepted on `fd` (its peer is the source) to a
    /// listener on `port`.
    func verdict(acceptedFD fd: Int32, port: UInt16) -> FilterReason {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let known = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) == 0 }
        }
        guard known else { return .malformed }
        return verdict(source: &storage, port: port, transport: .tcp)
    }

    func verdict(source storage: inout sockaddr_storage, port: UInt16, transport: PortRule.TransportProtocol) -> FilterReason {
        withUnsafeBytes(of: &storage) { verdict(address: $0.baseAddress!, port: port, transport: transport) }
    }

    /// The verdict for a `sockaddr_in` / `sockaddr_in6` read in place (a datagram's
    /// sender, straight from its receive buffer).
    func verdict(address raw: UnsafeRawPointer, port: UInt16, transport: PortRule.TransportProtocol) -> FilterReason {
        let source: FilterReason
        switch Int32(raw.load(as: sa_family_t.self)) {
        case AF_INET:
            source = sourceV4(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        case AF_INET6:
            let address = V6(high: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
                             low: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
            // An IPv4 client of a dual-stack listener (::ffff:a.b.c.d) is an IPv4 source.
            if address.high == 0, address.low >> 32 == 0xFFFF {
                source = sourceV4(UInt32(truncatingIfNeeded: address.low))
            } else {
                source = sourceV6(address)
            }
        default:
            return .notIP
        }
        if source.drops { return source }
        switch transport {
        case .tcp: if tcpPorts.contains(port) { return .blockedPortTCP }
        case .udp: if udpPorts.contains(port) { return .blockedPortUDP }
        }
        return source
    }

    private func sourceV4(_ address: UInt32) -> FilterReason {
        if SourceFilter.matches(address, allowedV4) { return .allowed }
        if SourceFilter.matches(address, blockedV4) { return .blockedSourceV4 }
        return .noMatch
    }

    private func sourceV6(_ address: V6) -> FilterReason {
        for group in allowedV6 where group.addresses.contains(address.masked(group.length)) { return .allowed }
        for group in blockedV6 where group.addresses.contains(address.masked(group.length)) { return .blockedSourceV6 }
        return .noMatch
    }

    private static func matches(_ address: UInt32, _ groups: [(length: Int, addresses: Set<UInt32>)]) -> Bool {
        for group in groups {
            let mask: UInt32 = group.length == 0 ? 0 : ~0 << (32 - group.length)
            if group.addresses.contains(address & mask) { return true }
        }
        return false
    }

    static func v4Key(_ bytes: [UInt8]) -> UInt32 {
        bytes.reduce(0) { $0 << 8 | UInt32($1) }
    }

    static func v6Key(_ bytes: [UInt8]) -> V6 {
        V6(high: bytes[0..<8].reduce(0) { $0 << 8 | UInt64($1) }, low: bytes[8..<16].reduce(0) { $0 << 8 | UInt64($1) })
    }
}

/// Where the control plane publishes the user-space filter: one atomic reference, loaded
/// by a worker only after a wake-up (as `SnapshotStore`).
final class FilterStore: Sendable {
    private let current = ManagedAtomic<SourceFilter>(.disabled)

    var filter: SourceFilter { current.load(ordering: .acquiring) }

    func publish(_ filter: SourceFilter) {
        current.store(filter, ordering: .releasing)
    }
}
