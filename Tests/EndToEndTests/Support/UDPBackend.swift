import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A UDP server on loopback for the UDP tests: echoes each datagram to its sender,
/// answers with its name (`identify`), with its name and the datagram (`tag`), or echoes
/// after a pause per datagram (`slowEcho`, slower than a flood), or with the datagram
/// grown to a size (`grow`, a small query with a large answer). Counts what it received
/// and from how many source ports (l4lb's sessions).
final class UDPBackend: @unchecked Sendable {
    enum Behavior { case echo, identify(String), tag(String), slowEcho(microseconds: UInt32), grow(Int) }

    let fd: Int32
    let port: UInt16
    let host: String
    private let behavior: Behavior
    private let lock = NSLock()
    private var _received = 0
    private var _sources = Set<UInt16>()
    private var stopped = false
    private var thread: Thread?
    private let exited = DispatchSemaphore(value: 0)

    var address: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    var received: Int { lock.withLock { _received } }
    var sources: Int { lock.withLock { _sources.count } }

    init(_ behavior: Behavior, host: String = "127.0.0.1") throws {
        self.behavior = behavior
        self.host = host
        var (storage, length) = Sockets.sockaddr(host, 0)
        let socketFD = socket(Int32(storage.ss_family), Int32(SOCK_DGRAM.rawValue), 0)
        fd = socketFD
        let bound = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(socketFD, $0, length) == 0 && getsockname(socketFD, $0, &length) == 0 }
        }
        guard bound else { throw Sockets.Failure("bind udp backend") }
        var size: Int32 = 8 << 20
        setsockopt(socketFD, SOL_SOCKET, SO_RCVBUF, &size, 4)
        port = withUnsafeBytes(of: storage) { raw in
            Int32(storage.ss_family) == AF_INET
                ? UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port)
                : UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port)
        }
        Sockets.setTimeout(fd, seconds: 0.2)
        let thread = Thread { [self] in serve() }
        thread.name = "udp-backend"
        thread.start()
        self.thread = thread
    }

    deinit { stop() }

    /// What `grow(size)` answers to `datagram`: it, then a known pattern up to `size` bytes.
    static func grown(_ datagram: [UInt8], to size: Int) -> [UInt8] {
        datagram + (0..<max(size - datagram.count, 0)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
    }

    /// A bound socket on loopback that never reads: datagrams to it vanish without an ICMP
    /// error. The caller closes it.
    static func silent() throws -> (fd: Int32, address: String) {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var (storage, length) = Sockets.sockaddr("127.0.0.1", 0)
        let bound = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw Sockets.Failure("bind backend") }
        let port = withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(as: sockaddr_in.self).sin_port) }
        return (fd, "127.0.0.1:\(port)")
    }

    /// Stops serving and closes the port: when this returns, datagrams to it draw ICMP
    /// port unreachable (the serving thread, which held the socket, has exited).
    func stop() {
        let first = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        shutdown(fd, Int32(SHUT_RDWR))
        exited.wait()
        close(fd)
    }

    private func serve() {
        defer { exited.signal() }
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while !lock.withLock({ stopped }) {
            var peer = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let n = withUnsafeMutablePointer(to: &peer) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
            }
            guard n > 0 || (n == 0 && length > 0), !lock.withLock({ stopped }) else { continue }
            let sourcePort = withUnsafeBytes(of: peer) { raw in
                Int32(peer.ss_family) == AF_INET ? UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port) : UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port)
            }
            lock.withLock {
                _received += 1
                _sources.insert(sourcePort)
            }
            let reply: [UInt8]
            switch behavior {
            case .echo: reply = Array(buffer[..<n])
            case .identify(let name): reply = Array(name.utf8)
            case .tag(let name): reply = Array("\(name):".utf8) + buffer[..<n]
            case .grow(let size): reply = UDPBackend.grown(Array(buffer[..<n]), to: size)
            case .slowEcho(let pause):
                usleep(pause)
                reply = Array(buffer[..<n])
            }
            _ = withUnsafePointer(to: &peer) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, reply, reply.count, 0, $0, length) }
            }
        }
    }
}
