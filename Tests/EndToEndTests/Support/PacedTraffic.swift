import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// New connections or UDP flows from one source at a steady rate, many in flight at once
/// (a dropped SYN must not hold the next attempt back): how many were served end to end.
/// Every attempt gets `patience` to be served, then is closed — before a dropped SYN's
/// first retransmission (1 s), so each attempt is one SYN. A UDP attempt binds its own
/// port, below the ephemeral range: a port the kernel chose again would be a flow (session)
/// l4lb already admitted — among 10,000 random picks from 28,000 ports, hundreds are.
enum PacedTraffic {
    /// UDP attempts cycle through these source ports.
    static let udpPorts: ClosedRange<UInt16> = 20000...31999
    struct Result {
        var attempts = 0
        /// The probe came back through l4lb.
        var served = 0
        var elapsed: TimeInterval = 0
    }

    enum Kind { case tcp, udp }

    /// `rate` attempts per second from `source` to `host:port` for `seconds`.
    static func run(_ kind: Kind, host: String, port: UInt16, source: String, rate: Double, seconds: Double,
                    patience: TimeInterval = 0.4) -> Result {
        let (target, targetLength) = Sockets.sockaddr(host, port)
        let probe = Array("paced-probe\n".utf8)
        struct Attempt {
            let fd: Int32
            let deadline: TimeInterval
            var sent: Bool
        }
        var pending: [Attempt] = []
        var result = Result()
        let start = Date()
        func now() -> TimeInterval { Date().timeIntervalSince(start) }
        var buffer = [UInt8](repeating: 0, count: 256)

        func open() {
            let type = kind == .tcp ? Int32(SOCK_STREAM.rawValue) : Int32(SOCK_DGRAM.rawValue)
            let fd = socket(Int32(target.ss_family), type | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { return }
            result.attempts += 1
            let sourcePort = kind == .udp ? udpPorts.lowerBound + UInt16(result.attempts % udpPorts.count) : 0
            let (local, localLength) = Sockets.sockaddr(source, sourcePort)
            var l = local
            _ = withUnsafePointer(to: &l) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, localLength) } }
            var t = target
            _ = withUnsafePointer(to: &t) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, targetLength) } }
            var attempt = Attempt(fd: fd, deadline: now() + patience, sent: false)
            if kind == .udp {
                attempt.sent = send(fd, probe, probe.count, 0) == probe.count
            }
            pending.append(attempt)
        }

        var next = 0
        while true {
            let elapsed = now()
            // Open every attempt that is due.
            while Double(next) / rate <= elapsed, Double(next) / rate < seconds {
                open()
                next += 1
            }
            let opening = Double(next) / rate < seconds
            if !opening, pending.isEmpty { break }
            // Expire what ran out of patience.
            pending.removeAll { attempt in
                guard attempt.deadline <= elapsed else { return false }
                close(attempt.fd)
                return true
            }
            var polls = pending.map { pollfd(fd: $0.fd, events: Int16($0.sent ? POLLIN : POLLOUT), revents: 0) }
            let wait = opening ? max(0, Double(next) / rate - now()) : 0.01
            _ = poll(&polls, nfds_t(polls.count), Int32(min(wait, 0.01) * 1000))
            var finished = Set<Int32>()
            for (i, p) in polls.enumerated() where p.revents != 0 {
                if !pending[i].sent {
                    var error: Int32 = 0
                    var size = socklen_t(4)
                    getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &error, &size)
                    if error != 0 || p.revents & Int16(POLLOUT) == 0 || send(p.fd, probe, probe.count, Int32(MSG_NOSIGNAL)) != probe.count {
                        finished.insert(p.fd)
                    } else {
                        pending[i].sent = true
                    }
                    continue
                }
                let n = recv(p.fd, &buffer, buffer.count, 0)
                if n < 0, errno == EAGAIN { continue }
                // A TCP echo may arrive in pieces; the probe is small enough to come whole.
                if n == probe.count, Array(buffer[..<n]) == probe { result.served += 1 }
                finished.insert(p.fd)
            }
            if !finished.isEmpty {
                pending.removeAll { attempt in
                    guard finished.contains(attempt.fd) else { return false }
                    close(attempt.fd)
                    return true
                }
            }
        }
        result.elapsed = min(now(), seconds)
        return result
    }
}
