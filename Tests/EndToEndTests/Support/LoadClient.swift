import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Drives many connections from one thread with `poll`: each sends `bytes` of its own
/// pattern stream and checks the same bytes come back (an echo path). With `concurrency`
/// below `connections` it is a closed loop: as one connection completes, the next starts.
enum LoadClient {
    struct Result {
        var completed = 0
        var failed: [String] = []
        var mismatched = 0
    }

    private struct Flow {
        var id: Int
        var fd: Int32
        var connected = false
        var sent = 0
        var received = 0
        var sender: PatternStream
        var checker: PatternStream
        /// Generated but not yet sent.
        var out: [UInt8] = []
        var outOffset = 0
    }

    static func echo(
        host: String = "127.0.0.1", port: UInt16, connections: Int, concurrency: Int? = nil, bytes: Int, timeout: TimeInterval
    ) -> Result {
        var result = Result()
        var flows: [Flow] = []
        var started = 0
        let limit = concurrency ?? connections
        let (storage, length) = Sockets.sockaddr(host, port)
        var chunk = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(timeout)

        func start() {
            let id = started
            started += 1
            let fd = socket(Int32(storage.ss_family), Int32(SOCK_STREAM.rawValue), 0)
            Sockets.setNonBlocking(fd, true)
            var s = storage
            let rc = withUnsafePointer(to: &s) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
            if rc != 0, errno != EINPROGRESS {
                result.failed.append("connect \(id): errno \(errno)")
                close(fd)
                return
            }
            flows.append(Flow(id: id, fd: fd, sender: PatternStream(seed: UInt64(id + 1)), checker: PatternStream(seed: UInt64(id + 1))))
        }

        while Date() < deadline {
            while flows.count < limit, started < connections { start() }
            if flows.isEmpty { break }
            var fds = flows.map { f -> pollfd in
                var events = Int16(POLLIN)
                if !f.connected || f.sent < bytes { events |= Int16(POLLOUT) }
                return pollfd(fd: f.fd, events: events, revents: 0)
            }
            guard poll(&fds, nfds_t(fds.count), 100) > 0 else { continue }
            var finished: [Int] = []
            for i in flows.indices where fds[i].revents != 0 {
                switch step(&flows[i], revents: fds[i].revents, bytes: bytes, chunk: &chunk) {
                case .open: break
                case .done:
                    result.completed += 1
                    finished.append(i)
                case .failed(let why):
                    if why == "bytes differ" { result.mismatched += 1 }
                    result.failed.append("flow \(flows[i].id): \(why)")
                    finished.append(i)
                }
            }
            for i in finished.reversed() {
                close(flows[i].fd)
                flows.remove(at: i)
            }
        }
        for f in flows {
            result.failed.append("flow \(f.id) timed out: sent \(f.sent), received \(f.received)")
            close(f.fd)
        }
        return result
    }

    private enum Step { case open, done, failed(String) }

    private static func step(_ f: inout Flow, revents: Int16, bytes: Int, chunk: inout [UInt8]) -> Step {
        if !f.connected {
            var error: Int32 = 0
            var size = socklen_t(4)
            getsockopt(f.fd, SOL_SOCKET, SO_ERROR, &error, &size)
            if error != 0 { return .failed("connect errno \(error)") }
            if revents & Int16(POLLOUT) != 0 { f.connected = true }
        }
        if f.connected, f.sent < bytes, revents & Int16(POLLOUT) != 0 {
            if f.outOffset == f.out.count {
                var out = [UInt8](repeating: 0, count: min(16384, bytes - f.sent))
                out.withUnsafeMutableBytes { f.sender.fill($0) }
                f.out = out
                f.outOffset = 0
            }
            let n = f.out[f.outOffset...].withUnsafeBytes { send(f.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno != EAGAIN { return .failed("send errno \(errno)") }
            } else {
                f.outOffset += n
                f.sent += n
            }
        }
        if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
            let n = recv(f.fd, &chunk, chunk.count, 0)
            if n == 0 { return .failed("EOF after \(f.received) of \(bytes) bytes") }
            if n < 0 { return errno == EAGAIN ? .open : .failed("recv errno \(errno)") }
            let ok = chunk[..<n].withUnsafeBytes { f.checker.matches($0) }
            if !ok { return .failed("bytes differ") }
            f.received += n
            if f.received == bytes { return .done }
        }
        return .open
    }
}
