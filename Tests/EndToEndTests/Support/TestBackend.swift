import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// An upstream server for tests: one thread, non-blocking sockets, `poll`. It records what
/// happened (connections accepted and closed, PROXY headers, bytes) for assertions.
final class TestBackend: @unchecked Sendable {
    enum Behavior {
        /// Sends back what it reads; closes after the client's EOF once all is echoed.
        case echo
        /// Reads until EOF, then sends everything back and closes.
        case replyAfterEOF
        /// Reads a PROXY protocol header (v1 line or v2 binary), records it, then echoes.
        case proxyProtocol
        /// Reads and checks a `PatternStream` with `seed`, only while not paused.
        case patternSink(seed: UInt64)
        /// Echoes each read after `milliseconds`: a slow upstream.
        case delayedEcho(milliseconds: Int)
        /// Sends `name` and a newline on accept, then closes after the client's EOF.
        case identify(String)
        /// Sends `bytes` of `PatternStream(seed:)`, then closes (a download of known size).
        case stream(bytes: Int, seed: UInt64)
        /// Sends `bytes` of `PatternStream(seed:)` and half-closes (FIN first), then reads
        /// and checks `PatternStream(seed: seed + 1)` until the client's EOF.
        case halfCloseFirst(bytes: Int, seed: UInt64)
    }

    let port: UInt16
    let host: String
    private let listener: Int32
    private let behavior: Behavior
    private let lock = NSLock()
    private var thread: Thread?
    private var running = true

    // Observed, under `lock`.
    private var _accepted = 0
    private var _closed = 0
    private var _headers: [[UInt8]] = []
    private var _sinkBytes = 0
    private var _sinkMismatch = false
    private var _dataConnections = 0
    private var _paused = false
    private var _listenerLost: String?

    var accepted: Int { lock.withLock { _accepted } }
    var closed: Int { lock.withLock { _closed } }
    var headers: [[UInt8]] { lock.withLock { _headers } }
    var sinkBytes: Int { lock.withLock { _sinkBytes } }
    var sinkMismatch: Bool { lock.withLock { _sinkMismatch } }
    /// Connections that sent at least one byte (health checks of type tcp send none).
    var dataConnections: Int { lock.withLock { _dataConnections } }
    /// Set when `poll` found the listening descriptor closed under the backend (a double
    /// close elsewhere in the test process): what was seen, for the failure message.
    var listenerLost: String? { lock.withLock { _listenerLost } }

    /// The listening descriptor as the kernel sees it now: still this socket, still
    /// listening, still on `port`.
    var listenerDiagnosis: String {
        var acceptConn: Int32 = 0
        var length = socklen_t(4)
        let rc = getsockopt(listener, SOL_SOCKET, SO_ACCEPTCONN, &acceptConn, &length)
        let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(listener)")) ?? "none"
        let bound = rc == 0 ? Sockets.localPort(listener) : 0
        return "fd \(listener) → \(link), listening \(rc == 0 ? String(acceptConn) : "error \(errno)"), port \(bound) (expected \(port)); lost: \(listenerLost ?? "no")"
    }

    var paused: Bool {
        get { lock.withLock { _paused } }
        set { lock.withLock { _paused = newValue } }
    }

    init(_ behavior: Behavior, host: String = "127.0.0.1", port: UInt16 = 0) throws {
        self.behavior = behavior
        self.host = host
        listener = try Sockets.listen(host: host, port: port, backlog: 4096)
        Sockets.setNonBlocking(listener, true)
        self.port = Sockets.localPort(listener)
        let thread = Thread { [self] in loop() }
        thread.name = "test-backend-\(self.port)"
        self.thread = thread
        thread.start()
    }

    /// `127.0.0.1:PORT` or `[::1]:PORT`, for configs.
    var address: String { host.contains(":") ? "\"[\(host)]:\(port)\"" : "\(host):\(port)" }

    func stop() {
        lock.withLock { running = false }
        _ = waitUntil(timeout: 5) { self.lock.withLock { self.thread == nil } }
    }

    deinit { stop() }

    private struct Connection {
        var fd: Int32
        var pending: [UInt8] = []
        var pendingOffset = 0
        var received: [UInt8] = []
        var eof = false
        var headerDone = false
        var pattern = PatternStream(seed: 0)
        var delayed: [UInt8] = []
        var sentData = false
        var releaseAt = Date.distantFuture
        /// Bytes still to produce from `source` (`.stream`, `.halfCloseFirst`).
        var sourceRemaining = 0
        var source = PatternStream(seed: 0)
        var halfClosed = false
    }

    /// Refills `pending` from the connection's source, if it has one.
    private func refill(_ c: inout Connection) {
        guard c.sourceRemaining > 0 else { return }
        let n = min(c.sourceRemaining, 65536)
        c.pending = [UInt8](repeating: 0, count: n)
        c.pending.withUnsafeMutableBytes { c.source.fill($0) }
        c.pendingOffset = 0
        c.sourceRemaining -= n
    }

    private func loop() {
        var connections: [Connection] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while lock.withLock({ running }) {
            let paused = self.paused
            let now = Date()
            for i in connections.indices where !connections[i].delayed.isEmpty && connections[i].releaseAt <= now {
                connections[i].pending += connections[i].delayed
                connections[i].delayed.removeAll()
                connections[i].releaseAt = .distantFuture
            }
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            for c in connections {
                var events: Int16 = 0
                if c.pendingOffset < c.pending.count { events |= Int16(POLLOUT) }
                else if !c.eof, !(paused && isSink) { events |= Int16(POLLIN) }
                fds.append(pollfd(fd: c.fd, events: events, revents: 0))
            }
            guard poll(&fds, nfds_t(fds.count), 2) >= 0 else { continue }
            var closedIndices: [Int] = []
            for i in 0..<(fds.count - 1) where fds[i + 1].revents != 0 {
                if !service(&connections[i], revents: fds[i + 1].revents, buffer: &buffer) {
                    close(connections[i].fd)
                    closedIndices.append(i)
                }
            }
            if !closedIndices.isEmpty {
                for i in closedIndices.reversed() { connections.remove(at: i) }
                lock.withLock { _closed += closedIndices.count }
            }
            if fds[0].revents & Int16(POLLNVAL) != 0, listenerLost == nil {
                lock.withLock { _listenerLost = "POLLNVAL on fd \(listener) at \(Date())" }
            }
            if fds[0].revents != 0 { acceptAll(&connections) }
        }
        for c in connections { close(c.fd) }
        close(listener)
        lock.withLock { thread = nil }
    }

    private var isSink: Bool { if case .patternSink = behavior { return true } else { return false } }

    private func acceptAll(_ connections: inout [Connection]) {
        while true {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            Sockets.setNonBlocking(fd, true)
            var c = Connection(fd: fd)
            if case .patternSink(let seed) = behavior { c.pattern = PatternStream(seed: seed) }
            if case .identify(let name) = behavior { c.pending = Array(name.utf8) + [0x0A] }
            if case .stream(let bytes, let seed) = behavior {
                c.source = PatternStream(seed: seed)
                c.sourceRemaining = bytes
                refill(&c)
            }
            if case .halfCloseFirst(let bytes, let seed) = behavior {
                c.source = PatternStream(seed: seed)
                c.sourceRemaining = bytes
                c.pattern = PatternStream(seed: seed + 1)
                refill(&c)
            }
            connections.append(c)
            lock.withLock { _accepted += 1 }
        }
    }

    /// Returns false when the connection is finished.
    private func service(_ c: inout Connection, revents: Int16, buffer: inout [UInt8]) -> Bool {
        if c.pendingOffset < c.pending.count {
            let n = c.pending[c.pendingOffset...].withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 { return errno == EAGAIN }
            c.pendingOffset += n
            if c.pendingOffset == c.pending.count {
                c.pending.removeAll(keepingCapacity: true)
                c.pendingOffset = 0
                if c.eof { return false }
                refill(&c)
                if c.pending.isEmpty {
                    if case .stream = behavior { return false }
                    if case .halfCloseFirst = behavior, !c.halfClosed {
                        c.halfClosed = true
                        shutdown(c.fd, Int32(SHUT_WR))
                    }
                }
            }
            return true
        }
        if revents & Int16(POLLIN | POLLHUP | POLLERR) == 0 { return true }
        let n = recv(c.fd, &buffer, buffer.count, 0)
        if n < 0 { return errno == EAGAIN }
        if n == 0 {
            c.eof = true
            switch behavior {
            case .replyAfterEOF:
                c.pending = c.received
                return !c.pending.isEmpty
            case .patternSink, .halfCloseFirst:
                return false
            default:
                return false
            }
        }
        if !c.sentData {
            c.sentData = true
            lock.withLock { _dataConnections += 1 }
        }
        switch behavior {
        case .echo:
            c.pending.append(contentsOf: buffer[..<n])
        case .replyAfterEOF:
            c.received.append(contentsOf: buffer[..<n])
        case .proxyProtocol:
            if c.headerDone {
                c.pending.append(contentsOf: buffer[..<n])
            } else {
                c.received.append(contentsOf: buffer[..<n])
                if let length = ProxyHeaderParser.headerLength(c.received) {
                    lock.withLock { _headers.append(Array(c.received[..<length])) }
                    c.pending.append(contentsOf: c.received[length...])
                    c.received.removeAll()
                    c.headerDone = true
                }
            }
        case .delayedEcho(let milliseconds):
            c.delayed.append(contentsOf: buffer[..<n])
            c.releaseAt = Date().addingTimeInterval(Double(milliseconds) / 1000)
        case .identify:
            break
        case .stream:
            break
        case .patternSink, .halfCloseFirst:
            let ok = buffer[..<n].withUnsafeBytes { c.pattern.matches($0) }
            lock.withLock {
                _sinkBytes += n
                if !ok { _sinkMismatch = true }
            }
        }
        return true
    }
}

/// Parses PROXY protocol headers as an upstream (HAProxy's spec) would.
enum ProxyHeaderParser {
    static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// The header's length once `bytes` holds all of it.
    static func headerLength(_ bytes: [UInt8]) -> Int? {
        if bytes.count >= 16, Array(bytes[0..<12]) == v2Signature {
            let length = 16 + Int(bytes[14]) << 8 + Int(bytes[15])
            return bytes.count >= length ? length : nil
        }
        if let cr = bytes.firstIndex(of: 0x0D), cr + 1 < bytes.count, bytes[cr + 1] == 0x0A { return cr + 2 }
        return nil
    }

    struct Parsed: Equatable {
        var version: Int
        var family: String
        var sourceIP: String
        var destinationIP: String
        var sourcePort: UInt16
        var destinationPort: UInt16
    }

    static func parse(_ header: [UInt8]) -> Parsed? {
        if header.count >= 16, Array(header[0..<12]) == v2Signature {
            guard header[12] == 0x21 else { return nil }
            let isV4 = header[13] == 0x11
            guard isV4 || header[13] == 0x21 else { return nil }
            let size = isV4 ? 4 : 16
            func ip(_ offset: Int) -> String {
                var text = [CChar](repeating: 0, count: 64)
                Array(header[offset..<(offset + size)]).withUnsafeBytes {
                    _ = inet_ntop(isV4 ? AF_INET : AF_INET6, $0.baseAddress, &text, 64)
                }
                return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            }
            let portOffset = 16 + 2 * size
            return Parsed(
                version: 2, family: isV4 ? "TCP4" : "TCP6", sourceIP: ip(16), destinationIP: ip(16 + size),
                sourcePort: UInt16(header[portOffset]) << 8 | UInt16(header[portOffset + 1]),
                destinationPort: UInt16(header[portOffset + 2]) << 8 | UInt16(header[portOffset + 3]))
        }
        // Bytes, not Characters: "\r\n" is one Character in Swift.
        guard header.count >= 2, header.suffix(2) == [0x0D, 0x0A] else { return nil }
        let parts = String(decoding: header.dropLast(2), as: UTF8.self).split(separator: " ")
        guard parts.count == 6, parts[0] == "PROXY", let sp = UInt16(parts[4]), let dp = UInt16(parts[5]) else { return nil }
        return Parsed(version: 1, family: String(parts[1]), sourceIP: String(parts[2]), destinationIP: String(parts[3]), sourcePort: sp, destinationPort: dp)
    }
}
