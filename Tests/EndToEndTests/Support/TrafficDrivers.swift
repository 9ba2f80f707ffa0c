import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Long-lived connections that stream both ways through an echo path for as long as the
/// test runs, from one thread with `poll`: each keeps up to `window` bytes of its own
/// pattern in flight and checks every byte that comes back. Any error, early EOF or wrong
/// byte is recorded with the connection's number.
final class StreamingConnections: @unchecked Sendable {
    struct Outcome {
        var sent = 0
        var received = 0
        var errors: [String] = []
    }

    private struct Flow {
        var fd: Int32
        var sent = 0
        var received = 0
        var sender: PatternStream
        var checker: PatternStream
        var failed = false
    }

    private let lock = NSLock()
    private var stopping = false
    private var result = Outcome()
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    private var flows: [Flow] = []
    private let window: Int

    /// Opens `count` connections to `port` (they must all be accepted) and starts streaming.
    init(port: UInt16, count: Int, window: Int = 32 * 1024) throws {
        self.window = window
        for i in 0..<count {
            let fd = try Sockets.connect(port: port)
            Sockets.setNonBlocking(fd, true)
            flows.append(Flow(fd: fd, sender: PatternStream(seed: UInt64(1000 + i)), checker: PatternStream(seed: UInt64(1000 + i))))
        }
        let thread = Thread { [self] in
            run()
            finished.signal()
        }
        thread.name = "streaming-connections"
        self.thread = thread
        thread.start()
    }

    /// Bytes echoed so far, across connections.
    var received: Int { lock.withLock { result.received } }

    /// Stops sending, waits (up to `timeout`) for every byte in flight to come back, closes
    /// the connections and returns what happened.
    func finish(timeout: TimeInterval = 30) -> Outcome {
        lock.withLock { stopping = true }
        if finished.wait(timeout: .now() + timeout + 5) == .timedOut {
            lock.withLock { result.errors.append("streaming thread did not finish") }
        }
        return lock.withLock { result }
    }

    private func run() {
        var chunk = [UInt8](repeating: 0, count: 16 * 1024)
        var drainDeadline: Date?
        while true {
            let stop = lock.withLock { stopping }
            if stop, drainDeadline == nil { drainDeadline = Date().addingTimeInterval(30) }
            let outstanding = flows.contains { !$0.failed && $0.received < $0.sent }
            if stop, !outstanding || Date() > drainDeadline! { break }
            var fds = flows.map { flow -> pollfd in
                var events = Int16(POLLIN)
                if !stop, !flow.failed, flow.sent - flow.received < window { events |= Int16(POLLOUT) }
                return pollfd(fd: flow.failed ? -1 : flow.fd, events: events, revents: 0)
            }
            _ = poll(&fds, nfds_t(fds.count), 50)
            var sent = 0
            var received = 0
            for i in flows.indices where fds[i].revents != 0 && !flows[i].failed {
                let revents = fds[i].revents
                if revents & Int16(POLLOUT) != 0 {
                    let room = min(chunk.count, window - (flows[i].sent - flows[i].received))
                    if room > 0 {
                        var sender = flows[i].sender
                        chunk.withUnsafeMutableBytes { sender.fill(UnsafeMutableRawBufferPointer(rebasing: $0[0..<room])) }
                        let n = chunk.withUnsafeBytes { send(flows[i].fd, $0.baseAddress, room, Int32(MSG_NOSIGNAL)) }
                        if n > 0 {
                            // Keep the stream in step with what was actually sent.
                            var replay = flows[i].sender
                            var skip = [UInt8](repeating: 0, count: n)
                            skip.withUnsafeMutableBytes { replay.fill($0) }
                            flows[i].sender = replay
                            flows[i].sent += n
                            sent += n
                        } else if n < 0, errno != EAGAIN {
                            fail(i, "send: \(String(cString: strerror(errno)))")
                            continue
                        }
                    }
                }
                if revents & Int16(POLLIN | POLLERR | POLLHUP) != 0 {
                    let n = chunk.withUnsafeMutableBytes { recv(flows[i].fd, $0.baseAddress, $0.count, 0) }
                    if n > 0 {
                        let ok = chunk.withUnsafeBytes { flows[i].checker.matches(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                        flows[i].received += n
                        received += n
                        if !ok { fail(i, "echoed bytes differ near offset \(flows[i].received)") }
                    } else if n == 0 {
                        fail(i, "closed by the proxy after \(flows[i].received) bytes")
                    } else if errno != EAGAIN {
                        fail(i, "recv: \(String(cString: strerror(errno)))")
                    }
                }
            }
            lock.withLock {
                result.sent += sent
                result.received += received
            }
        }
        for flow in flows where flow.received < flow.sent && !flow.failed {
            lock.withLock { result.errors.append("connection lost \(flow.sent - flow.received) bytes in flight") }
        }
        for flow in flows { close(flow.fd) }
    }

    private func fail(_ i: Int, _ what: String) {
        flows[i].failed = true
        lock.withLock { result.errors.append("connection \(i): \(what)") }
    }
}

/// New connections one after another, each an echo exchange of `bytes`, on a thread of
/// its own until stopped (or `limit` connections).
final class ConnectionChurn: @unchecked Sendable {
    struct Outcome {
        var succeeded = 0
        var failures: [String] = []
        var bytesSent = 0
    }

    private let lock = NSLock()
    private var stopping = false
    private var result = Outcome()
    private let finished = DispatchSemaphore(value: 0)

    init(port: UInt16, bytes: Int = 512, limit: Int = 1_000_000) {
        let thread = Thread { [self] in
            var n = 0
            while n < limit, !lock.withLock({ stopping }) {
                n += 1
                let payload = (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &+ n) }
                do {
                    let fd = try Sockets.connect(port: port)
                    defer { close(fd) }
                    Sockets.setTimeout(fd, seconds: 10)
                    try Sockets.sendAll(fd, payload)
                    lock.withLock { result.bytesSent += bytes }
                    let echoed = try Sockets.receiveExactly(fd, bytes)
                    if echoed != payload { throw Sockets.Failure("echo differs", 0) }
                    lock.withLock { result.succeeded += 1 }
                } catch {
                    lock.withLock { result.failures.append("connection \(n): \(error)") }
                }
            }
            finished.signal()
        }
        thread.name = "connection-churn"
        thread.start()
    }

    var succeeded: Int { lock.withLock { result.succeeded } }

    func finish() -> Outcome {
        lock.withLock { stopping = true }
        finished.wait()
        return lock.withLock { result }
    }
}
