import CTestSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Waits for readiness with edge-triggered epoll, so thousands of stalled connections cost
/// the test nothing while they stay stalled (`poll` would scan them all every time).
final class EdgePoller {
    static let readable: UInt32 = 0x001, writable: UInt32 = 0x004, error: UInt32 = 0x008, hangUp: UInt32 = 0x010
    static let peerClosed: UInt32 = 0x2000  // EPOLLRDHUP
    static let edgeTriggered: UInt32 = 1 << 31
    static let ended = error | hangUp | peerClosed

    let fd: Int32
    private var fds = [Int32](repeating: 0, count: 256)
    private var events = [UInt32](repeating: 0, count: 256)

    init() { fd = CTest_epoll_create() }
    deinit { close(fd) }

    func add(_ socket: Int32, events: UInt32) {
        _ = CTest_epoll_add(fd, socket, events | EdgePoller.edgeTriggered)
    }

    /// Ready sockets and their events, waiting at most `milliseconds`.
    func wait(milliseconds: Int32, _ body: (Int32, UInt32) -> Void) {
        let n = CTest_epoll_wait(fd, &fds, &events, 256, milliseconds)
        for i in 0..<max(0, Int(n)) { body(fds[i], events[i]) }
    }
}

/// Upstreams that misbehave at scale: one that streams without end to every connection,
/// one that accepts and never reads. Counts connections accepted and closed by the peer.
final class HostileBackend: @unchecked Sendable {
    enum Behavior {
        /// Sends zeros without end and discards what it reads.
        case firehose
        /// Never reads.
        case neverReads
    }

    let port: UInt16
    private let listener: Int32
    private let behavior: Behavior
    private let poller = EdgePoller()
    private let lock = NSLock()
    private var running = true
    private var finished = false
    private var _accepted = 0
    private var _closed = 0

    var accepted: Int { lock.withLock { _accepted } }
    var closed: Int { lock.withLock { _closed } }
    var address: String { "127.0.0.1:\(port)" }

    /// `socketBuffer` sets SO_SNDBUF and SO_RCVBUF of every accepted socket: small ones
    /// keep thousands of stalled connections from filling the kernel's TCP memory.
    init(_ behavior: Behavior, socketBuffer: Int32) throws {
        self.behavior = behavior
        listener = try Sockets.listen(host: "127.0.0.1", port: 0, backlog: 4096)
        var size = socketBuffer
        // Accepted sockets inherit both from the listener.
        setsockopt(listener, SOL_SOCKET, SO_SNDBUF, &size, 4)
        setsockopt(listener, SOL_SOCKET, SO_RCVBUF, &size, 4)
        Sockets.setNonBlocking(listener, true)
        port = Sockets.localPort(listener)
        poller.add(listener, events: EdgePoller.readable)
        Thread { [self] in loop() }.start()
    }

    deinit {
        lock.withLock { running = false }
        _ = waitUntil(timeout: 5) { lock.withLock { finished } }
    }

    private func loop() {
        var open = Set<Int32>()
        let zeros = [UInt8](repeating: 0, count: 65536)
        var sink = [UInt8](repeating: 0, count: 65536)
        while lock.withLock({ running }) {
            poller.wait(milliseconds: 50) { fd, events in
                if fd == listener {
                    while case let client = accept(listener, nil, nil), client >= 0 {
                        Sockets.setNonBlocking(client, true)
                        let interest = behavior == .firehose
                            ? EdgePoller.readable | EdgePoller.writable | EdgePoller.peerClosed : EdgePoller.peerClosed
                        poller.add(client, events: interest)
                        open.insert(client)
                        lock.withLock { _accepted += 1 }
                    }
                    return
                }
                var gone = events & EdgePoller.ended != 0
                if behavior == .firehose, !gone {
                    while true {
                        let n = recv(fd, &sink, sink.count, 0)
                        if n == 0 || (n < 0 && errno != EAGAIN) { gone = true }
                        if n <= 0 { break }
                    }
                    while !gone {
                        let n = zeros.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                        if n < 0 {
                            if errno != EAGAIN { gone = true }
                            break
                        }
                    }
                }
                if gone, open.remove(fd) != nil {
                    close(fd)
                    lock.withLock { _closed += 1 }
                }
            }
        }
        open.forEach { close($0) }
        close(listener)
        lock.withLock { finished = true }
    }
}

/// Clients that upload without end: a thread writes to each socket whenever it is
/// writable, until stopped, and notes which the peer closed.
final class Uploaders: @unchecked Sendable {
    let fds: [Int32]
    private let poller = EdgePoller()
    private let lock = NSLock()
    private var running = true
    private var lastProgress = Date()
    private var closedByPeer = Set<Int32>()
    private var finished = false

    init(fds: [Int32]) {
        self.fds = fds
        for fd in fds {
            Sockets.setNonBlocking(fd, true)
            poller.add(fd, events: EdgePoller.writable | EdgePoller.peerClosed)
        }
        Thread { [self] in loop() }.start()
    }

    private func loop() {
        let chunk = [UInt8](repeating: 0x55, count: 16384)
        while lock.withLock({ running }) {
            var wrote = false
            var gone: [Int32] = []
            poller.wait(milliseconds: 50) { fd, events in
                if events & EdgePoller.ended != 0 {
                    gone.append(fd)
                    return
                }
                while true {
                    let n = chunk.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    if n > 0 {
                        wrote = true
                        continue
                    }
                    if n < 0, errno != EAGAIN { gone.append(fd) }
                    break
                }
            }
            lock.withLock {
                if wrote { lastProgress = Date() }
                closedByPeer.formUnion(gone)
            }
        }
        lock.withLock { finished = true }
    }

    /// Waits until no upload has moved a byte for `quietFor` seconds.
    func waitUntilStalled(quietFor: TimeInterval, timeout: TimeInterval) -> Bool {
        waitUntil(timeout: timeout) { lock.withLock { Date().timeIntervalSince(lastProgress) >= quietFor } }
    }

    var allClosedByPeer: Bool { lock.withLock { closedByPeer.count == fds.count } }

    func stop() {
        lock.withLock { running = false }
        _ = waitUntil(timeout: 5) { lock.withLock { finished } }
        fds.forEach { close($0) }
    }
}
