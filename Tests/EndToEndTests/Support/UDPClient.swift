import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// UDP client sockets for the end-to-end tests: connected to the proxy (from a chosen
/// source address when given), with a large receive buffer and a receive timeout.
enum UDPClient {
    /// A connected client socket to `host:port`, from `source` when given.
    static func connect(host: String, port: UInt16, source: String? = nil, sourcePort: UInt16 = 0, timeout: TimeInterval = 2) throws -> Int32 {
        var (target, length) = Sockets.sockaddr(host, port)
        let fd = socket(Int32(target.ss_family), Int32(SOCK_DGRAM.rawValue), 0)
        if let source {
            var (local, localLength) = Sockets.sockaddr(source, sourcePort)
            _ = withUnsafePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, localLength) } }
        }
        let ok = withUnsafePointer(to: &target) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) == 0 } }
        guard ok else { throw Sockets.Failure("connect udp") }
        var size: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4)
        Sockets.setTimeout(fd, seconds: timeout)
        return fd
    }

    /// Sends `payload` and waits for one datagram back (nil on timeout or error).
    static func exchange(_ fd: Int32, _ payload: [UInt8]) -> [UInt8]? {
        guard send(fd, payload, payload.count, 0) == payload.count else { return nil }
        var buffer = [UInt8](repeating: 0, count: 65_536)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n >= 0 ? Array(buffer[..<n]) : nil
    }
}
