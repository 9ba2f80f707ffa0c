import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Drives many concurrent connections from one thread with `poll`: each sends `bytes` of
/// its own pattern stream and checks that the same bytes come back (an echo path).
enum LoadClient {
    struct Result {
        var completed = 0
        var failed: [String] = []
        var mismatched = 0
    }

    private struct Flow {
        var fd: Int32
        var connected = false
        var sent = 0
        var received = 0
        var sender: PatternStream
        var checker: PatternStream
        var done = false
        /// Generated but not yet sent.
        var out: [UInt8] = []
        var outOffset = 0
    }

    static func echo(host: String = "127.0.0.1", port: UInt16, connections: Int, bytes: Int, timeout: TimeInterval) -> Result {
        var result = Result()
        var flows: [Flow] = []
        let (storage, length) = Sockets.sockaddr(host, port)
        for i in 0..<connections {
            let fd = socket(Int32(storage.ss_family), Int32(SOCK_STREAM.rawValue), 0)
            Sockets.setNonBlocking(fd, true)
            var s = storage
            let rc = withUnsafePointer(to: &s) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
            if rc != 0, errno != EINPROGRESS {
                result.failed.append("connect \(i): errno \(errno)")
                close(fd)
                continue
            }
            flows.append(Flow(fd: fd, sender: PatternStream(seed: UInt64(i + 1)), checker: PatternStream(seed: UInt64(i + 1))))
        }
        var chunk = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(timeout)
        var open = flows.count
        while open > 0, Date() < deadline {
            var fds = flows.map { f -> pollfd in
                var events: Int16 = 0
                if !f.done {
                    events = Int16(POLLIN)
                    if !f.connected || f.sent < bytes { events |= Int16(POLLOUT) }
                }
                return pollfd(fd: f.done ? -1 : f.fd, events: events, revents: 0)
            }
            guard poll(&fds, nfds_t(fds.count), 100) > 0 else { continue }
            for i in flows.indices where !flows[i].done && fds[i].revents != 0 {
                var f = flows[i]
                defer { flows[i] = f }
                func fail(_ why: String) {
                    result.failed.append("flow \(i): \(why)")
                    f.done = true
                    close(f.fd)
                    open -= 1
                }
                if !f.connected {
                    var error: Int32 = 0
                    var size = socklen_t(4)
                    getsockopt(f.fd, SOL_SOCKET, SO_ERROR, &error, &size)
                    if error != 0 { fail("connect errno \(error)"); continue }
                    if fds[i].revents & Int16(POLLOUT) != 0 { f.connected = true }
                }
                if f.connected, f.sent < bytes, fds[i].revents & Int16(POLLOUT) != 0 {
                    if f.outOffset == f.out.count {
                        let count = min(16384, bytes - f.sent - (f.out.count - f.outOffset))
                        var out = [UInt8](repeating: 0, count: count)
                        out.withUnsafeMutableBytes { f.sender.fill($0) }
                        f.out = out
                        f.outOffset = 0
                    }
                    let n = f.out[f.outOffset...].withUnsafeBytes { send(f.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    if n < 0 {
                        if errno != EAGAIN { fail("send errno \(errno)"); continue }
                    } else {
                        f.outOffset += n
                        f.sent += n
                    }
                }
                if fds[i].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    let n = recv(f.fd, &chunk, chunk.count, 0)
                    if n == 0 { fail("EOF after \(f.received) of \(bytes) bytes"); continue }
                    if n < 0 {
                        if errno != EAGAIN { fail("recv errno \(errno)") }
                        continue
                    }
                    let ok = chunk[..<n].withUnsafeBytes { f.checker.matches($0) }
                    if !ok { result.mismatched += 1; fail("bytes differ"); continue }
                    f.received += n
                    if f.received == bytes {
                        f.done = true
                        close(f.fd)
                        open -= 1
                        result.completed += 1
                    }
                }
            }
        }
        for f in flows where !f.done {
            result.failed.append("timed out: sent \(f.sent), received \(f.received)")
            close(f.fd)
        }
        return result
    }
}
