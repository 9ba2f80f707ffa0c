import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Small blocking-socket helpers for tests. Every call is bounded by a timeout.
enum Sockets {
    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ what: String, _ code: Int32 = errno) { description = "\(what): \(String(cString: strerror(code))) (errno \(code))" }
    }

    /// Raises this process's open-file limit to the hard limit (1,000 proxied connections
    /// need ~2,000 descriptors in the test process).
    static func raiseFileLimit() {
        var limit = rlimit()
        getrlimit(RLIMIT_NOFILE_VALUE, &limit)
        limit.rlim_cur = limit.rlim_max
        setrlimit(RLIMIT_NOFILE_VALUE, &limit)
    }

    static var RLIMIT_NOFILE_VALUE: __rlimit_resource_t { __rlimit_resource_t(RLIMIT_NOFILE.rawValue) }

    static func sockaddr(_ host: String, _ port: UInt16) -> (sockaddr_storage, socklen_t) {
        var storage = sockaddr_storage()
        let length: socklen_t
        if host.contains(":") {
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            inet_pton(AF_INET6, host, &sin6.sin6_addr)
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sin6, as: sockaddr_in6.self) }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            inet_pton(AF_INET, host, &sin.sin_addr)
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sin, as: sockaddr_in.self) }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        return (storage, length)
    }

    /// A free TCP port on loopback (bound and released; the kernel will not hand it out
    /// again soon).
    static func freePort(host: String = "127.0.0.1") -> UInt16 {
        let fd = try! listen(host: host, port: 0)
        defer { close(fd) }
        return localPort(fd)
    }

    static func localPort(_ fd: Int32) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return withUnsafeBytes(of: storage) { raw in
            Int32(storage.ss_family) == AF_INET
                ? UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port)
                : UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port)
        }
    }

    static func listen(host: String, port: UInt16, backlog: Int32 = 1024) throws -> Int32 {
        let (storage, length) = sockaddr(host, port)
        let fd = socket(Int32(storage.ss_family), Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        var s = storage
        let rc = withUnsafePointer(to: &s) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0 else { let e = errno; close(fd); throw Failure("bind \(host):\(port)", e) }
        guard Glibc.listen(fd, backlog) == 0 else { let e = errno; close(fd); throw Failure("listen", e) }
        return fd
    }

    /// Connects with a timeout; throws with the errno (ECONNREFUSED, ETIMEDOUT…).
    static func connect(host: String = "127.0.0.1", port: UInt16, timeout: TimeInterval = 5, bindTo source: String? = nil,
                        sourcePort: UInt16 = 0) throws -> Int32 {
        let (storage, length) = sockaddr(host, port)
        let fd = socket(Int32(storage.ss_family), Int32(SOCK_STREAM.rawValue), 0)
        if let source {
            var (local, localLength) = sockaddr(source, sourcePort)
            _ = withUnsafePointer(to: &local) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { bind(fd, $0, localLength) } }
        }
        setNonBlocking(fd, true)
        var s = storage
        let rc = withUnsafePointer(to: &s) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
        if rc != 0 {
            guard errno == EINPROGRESS else { let e = errno; close(fd); throw Failure("connect \(host):\(port)", e) }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            guard poll(&p, 1, Int32(timeout * 1000)) == 1 else { close(fd); throw Failure("connect \(host):\(port)", ETIMEDOUT) }
            var error: Int32 = 0
            var size = socklen_t(4)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size)
            guard error == 0 else { close(fd); throw Failure("connect \(host):\(port)", error) }
        }
        setNonBlocking(fd, false)
        setTimeout(fd, seconds: timeout)
        return fd
    }

    /// Connects with the socket's receive or send buffer set small first (a slow phone,
    /// or a client that fills its pipe at once).
    static func connect(port: UInt16, receiveBuffer: Int32? = nil, sendBuffer: Int32? = nil) throws -> Int32 {
        let (storage, length) = sockaddr("127.0.0.1", port)
        let fd = socket(Int32(storage.ss_family), Int32(SOCK_STREAM.rawValue), 0)
        if var size = receiveBuffer { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4) }
        if var size = sendBuffer { setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, 4) }
        var s = storage
        let rc = withUnsafePointer(to: &s) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
        guard rc == 0 else { let e = errno; close(fd); throw Failure("connect 127.0.0.1:\(port)", e) }
        return fd
    }

    /// Whether the peer has closed or reset `fd` (without reading from it).
    static func isClosedByPeer(_ fd: Int32) -> Bool {
        let rdhup: Int16 = 0x2000  // POLLRDHUP, which Glibc's module does not export
        var p = pollfd(fd: fd, events: rdhup, revents: 0)
        return poll(&p, 1, 0) == 1 && p.revents & (rdhup | Int16(POLLHUP | POLLERR)) != 0
    }

    static func setNonBlocking(_ fd: Int32, _ on: Bool) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
    }

    static func setTimeout(_ fd: Int32, seconds: TimeInterval) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw Failure("send") }
            offset += n
        }
    }

    /// Reads until EOF (or `limit` bytes); throws on error or timeout.
    static func receiveAll(_ fd: Int32, limit: Int = .max) throws -> [UInt8] {
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while result.count < limit {
            let n = recv(fd, &chunk, min(chunk.count, limit - result.count), 0)
            if n == 0 { break }
            guard n > 0 else { throw Failure("recv") }
            result.append(contentsOf: chunk[..<n])
        }
        return result
    }

    static func receiveExactly(_ fd: Int32, _ count: Int) throws -> [UInt8] {
        let bytes = try receiveAll(fd, limit: count)
        guard bytes.count == count else { throw Failure("recv: EOF after \(bytes.count) of \(count) bytes", 0) }
        return bytes
    }

    /// Waits for EOF or a reset on `fd`; returns how long it took, or nil on timeout.
    static func waitForClose(_ fd: Int32, timeout: TimeInterval) -> TimeInterval? {
        let start = Date()
        var chunk = [UInt8](repeating: 0, count: 4096)
        setTimeout(fd, seconds: 0.05)
        while Date().timeIntervalSince(start) < timeout {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { return Date().timeIntervalSince(start) }
        }
        return nil
    }
}

/// A deterministic byte stream (an LCG per connection), so a test can check gigabytes
/// without keeping them.
struct PatternStream {
    var state: UInt64

    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }

    mutating func next() -> UInt8 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return UInt8(truncatingIfNeeded: state >> 56)
    }

    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        for i in 0..<buffer.count { buffer[i] = next() }
    }

    /// Whether `buffer` continues the stream.
    mutating func matches(_ buffer: UnsafeRawBufferPointer) -> Bool {
        for i in 0..<buffer.count where buffer[i] != next() { return false }
        return true
    }
}

/// Polls `condition` until it holds or `timeout` passes.
func waitUntil(timeout: TimeInterval, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
