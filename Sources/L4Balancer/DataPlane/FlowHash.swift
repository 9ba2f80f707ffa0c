#if canImport(Glibc)
import Glibc
#endif

/// The key hash-based balancers use for a connection, from the accepted socket's peer
/// (and, for `five_tuple`, local) address. IPv4-mapped IPv6 addresses hash as IPv4, so a
/// client hashes the same on a dual-stack listener. `StableHash` keeps it identical on
/// every instance.
public enum FlowHash {
    /// A UDP client's key, from the address its datagram came from (`five_tuple` hashes as
    /// `source_ip_port`: the listener's address is the same for every client).
    static func compute(peer: UnsafeRawPointer, length: Int, key: Config.Cluster.HashKey) -> UInt64 {
        var bytes: (UInt64, UInt64, UInt64) = (0, 0, 0)
        var count = 0
        withUnsafeMutableBytes(of: &bytes) { out in
            switch Int32(peer.load(as: sa_family_t.self)) {
            case AF_INET where length >= MemoryLayout<sockaddr_in>.size:
                let sin = peer.load(as: sockaddr_in.self)
                withUnsafeBytes(of: sin.sin_addr) { for b in $0 { out[count] = b; count += 1 } }
                if key != .sourceIP { withUnsafeBytes(of: sin.sin_port) { for b in $0 { out[count] = b; count += 1 } } }
            case AF_INET6 where length >= MemoryLayout<sockaddr_in6>.size:
                let sin6 = peer.load(as: sockaddr_in6.self)
                withUnsafeBytes(of: sin6.sin6_addr) { raw in
                    let mapped = raw[0..<10].allSatisfy { $0 == 0 } && raw[10] == 0xFF && raw[11] == 0xFF
                    for b in raw[(mapped ? 12 : 0)...] { out[count] = b; count += 1 }
                }
                if key != .sourceIP { withUnsafeBytes(of: sin6.sin6_port) { for b in $0 { out[count] = b; count += 1 } } }
            default:
                break
            }
        }
        return withUnsafeBytes(of: bytes) { StableHash.hash($0[..<count]) }
    }

    static func compute(client fd: Int32, key: Config.Cluster.HashKey) -> UInt64 {
        var bytes: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)
        var count = 0
        withUnsafeMutableBytes(of: &bytes) { out in
            func append(_ storage: inout sockaddr_storage, withPort: Bool) {
                switch Int32(storage.ss_family) {
                case AF_INET:
                    let sin = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
                    withUnsafeBytes(of: sin.sin_addr) { for b in $0 { out[count] = b; count += 1 } }
                    if withPort { withUnsafeBytes(of: sin.sin_port) { for b in $0 { out[count] = b; count += 1 } } }
                case AF_INET6:
                    let sin6 = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
                    withUnsafeBytes(of: sin6.sin6_addr) { raw in
                        let mapped = raw[0..<10].allSatisfy { $0 == 0 } && raw[10] == 0xFF && raw[11] == 0xFF
                        for b in raw[(mapped ? 12 : 0)...] { out[count] = b; count += 1 }
                    }
                    if withPort { withUnsafeBytes(of: sin6.sin6_port) { for b in $0 { out[count] = b; count += 1 } } }
                default:
                    break
                }
            }
            var peer = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let ok = withUnsafeMutablePointer(to: &peer) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) == 0 }
            }
            guard ok else { return }
            append(&peer, withPort: key != .sourceIP)
            if key == .fiveTuple {
                var local = sockaddr_storage()
                length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                _ = withUnsafeMutablePointer(to: &local) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
                }
                append(&local, withPort: true)
                out[count] = UInt8(IPPROTO_TCP)
                count += 1
            }
        }
        return withUnsafeBytes(of: bytes) { StableHash.hash($0[..<count]) }
    }

    /// The key of a TCP connection from `client` (4 or 16 bytes, network order; an IPv4
    /// client as its 4 bytes) to `listener`, the bytes `compute(client:key:)` reads from
    /// the accepted socket: what the kernel forwarder hashes for a SYN, and what tests
    /// compare it with.
    public static func compute(client: [UInt8], clientPort: UInt16, listener: [UInt8], listenerPort: UInt16,
                               key: Config.Cluster.HashKey) -> UInt64 {
        var bytes = client
        if key != .sourceIP { bytes += [UInt8(clientPort >> 8), UInt8(clientPort & 0xFF)] }
        if key == .fiveTuple { bytes += listener + [UInt8(listenerPort >> 8), UInt8(listenerPort & 0xFF), UInt8(IPPROTO_TCP)] }
        return StableHash.hash(bytes)
    }
}
