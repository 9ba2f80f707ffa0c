import Atomics
import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// The blocklist as the workers enforce it in user space (where XDP is not attached): the
/// same verdicts as bpf/xdp_filter.bpf.c, taken once per accepted connection, before any
/// byte reaches an upstream. Immutable; the control plane publishes a new one through
/// `FilterStore` when the lists change.
final class SourceFilter: AtomicReference, @unchecked Sendable {
    /// False when XDP enforces the lists (or they are empty): accepts skip the check.
    let enforcing: Bool
    private let blocked: PrefixSet
    private let allowed: PrefixSet
    private let tcpPorts: Set<UInt16>
    private let udpPorts: Set<UInt16>

    static let disabled = SourceFilter(enforcing: false, blocked: [], allowed: [])

    init(enforcing: Bool, blocked: [FilterEntry], allowed: [SourcePrefix]) {
        var sources: [SourcePrefix] = []
        var tcp = Set<UInt16>(), udp = Set<UInt16>()
        for entry in blocked {
            switch entry {
            case .source(let prefix): sources.append(prefix)
            case .port(let rule): if rule.transport == .tcp { tcp.insert(rule.port) } else { udp.insert(rule.port) }
            }
        }
        self.enforcing = enforcing && !blocked.isEmpty
        self.blocked = PrefixSet(sources)
        self.allowed = PrefixSet(allowed)
        tcpPorts = tcp
        udpPorts = udp
    }

    /// The accepted socket's peer address; false if the kernel cannot say (it reset).
    static func peer(of fd: Int32, into storage: inout sockaddr_storage) -> Bool {
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        return withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) == 0 }
        }
    }

    func verdict(source storage: inout sockaddr_storage, port: UInt16, transport: PortRule.TransportProtocol) -> FilterReason {
        withUnsafeBytes(of: &storage) { verdict(address: $0.baseAddress!, port: port, transport: transport) }
    }

    /// The verdict for a `sockaddr_in` / `sockaddr_in6` read in place (a datagram's
    /// sender, straight from its receive buffer).
    func verdict(address raw: UnsafeRawPointer, port: UInt16, transport: PortRule.TransportProtocol) -> FilterReason {
        guard let address = SourceAddress(raw) else { return .notIP }
        let source: FilterReason
        if allowed.contains(address) {
            source = .allowed
        } else if blocked.contains(address) {
            source = address.isV4 ? .blockedSourceV4 : .blockedSourceV6
        } else {
            source = .noMatch
        }
        if source.drops { return source }
        switch transport {
        case .tcp: if tcpPorts.contains(port) { return .blockedPortTCP }
        case .udp: if udpPorts.contains(port) { return .blockedPortUDP }
        }
        return source
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
