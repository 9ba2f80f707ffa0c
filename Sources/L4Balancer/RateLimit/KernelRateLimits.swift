import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// Which listeners' token buckets (`new_connections`, `packets`) the XDP program enforces,
/// and the rules it is given. A listener's buckets move to XDP only when the program is
/// attached on every interface its address lives on (a wildcard listener: every interface
/// that is up); otherwise some of its traffic would arrive where XDP does not look, and the
/// workers keep enforcing them. `max_connections` always stays in user space: it needs to
/// see connections close.
enum KernelRateLimits {
    /// Names of the listeners whose buckets XDP can enforce on `attached` interfaces.
    static func covered(_ listeners: [Config.Listener], attached: Set<String>) -> Set<String> {
        guard !attached.isEmpty else { return [] }
        let (owners, up) = interfaceAddresses()
        var covered: Set<String> = []
        for listener in listeners {
            guard let limit = listener.rateLimit, limit.newConnections != nil || limit.packets != nil else { continue }
            let wildcard = listener.address.ip.allSatisfy { $0 == 0 }
            // 127.0.0.0/8 is all on lo, whichever of its addresses lo lists.
            let reachedOn = wildcard ? up : listener.address.isLoopback ? ["lo"] : owners[listener.address.ip, default: []]
            if !reachedOn.isEmpty, reachedOn.isSubset(of: attached) { covered.insert(listener.name) }
        }
        return covered
    }

    /// The program's rules for the listeners in `covered`.
    static func rules(_ snapshot: Snapshot) -> [XDPFilter.RateRule] {
        snapshot.listeners.compactMap { listener in
            guard listener.rateLimitInKernel, let limit = listener.rateLimit else { return nil }
            return XDPFilter.RateRule(
                id: UInt32(listener.id), address: listener.address.ip, port: listener.address.port,
                transport: listener.transport == .udp ? .udp : .tcp,
                prefixV4: limit.prefixV4, prefixV6: limit.prefixV6,
                udpFlows: listener.session == .client,
                connectionInterval: limit.newConnections?.intervalNanoseconds ?? 0,
                connectionTolerance: limit.newConnections?.toleranceNanoseconds ?? 0,
                packetInterval: limit.packets?.intervalNanoseconds ?? 0,
                packetTolerance: limit.packets?.toleranceNanoseconds ?? 0,
                flowIdle: UInt64(max(listener.idleTimeoutMilliseconds, 1)) * 1_000_000,
                exempt: limit.exempt)
        }
    }

    /// Interface names by address they hold, and the names of those that are up.
    private static func interfaceAddresses() -> (owners: [[UInt8]: Set<String>], up: Set<String>) {
        var owners: [[UInt8]: Set<String>] = [:]
        var up: Set<String> = []
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0 else { return ([:], []) }
        defer { freeifaddrs(list) }
        var cursor = list
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            let name = String(cString: entry.pointee.ifa_name)
            if entry.pointee.ifa_flags & UInt32(IFF_UP) != 0 { up.insert(name) }
            guard let address = entry.pointee.ifa_addr else { continue }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let bytes = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { pointer in
                    withUnsafeBytes(of: pointer.pointee.sin_addr) { Array($0) }
                }
                owners[bytes, default: []].insert(name)
            case AF_INET6:
                let bytes = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { pointer in
                    withUnsafeBytes(of: pointer.pointee.sin6_addr) { Array($0) }
                }
                owners[bytes, default: []].insert(name)
            default:
                break
            }
        }
        return (owners, up)
    }
}
