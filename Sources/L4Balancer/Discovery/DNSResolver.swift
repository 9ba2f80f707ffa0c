import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Asks resolvers for a name's records (issue 36): UDP with EDNS0 first, the same query over
/// TCP when the answer comes truncated, the next resolver when one does not answer in time.
/// Blocking: it runs on discovery's own thread, never on a worker's.
public struct DNSResolver: Sendable {
    public let servers: [SocketAddress]
    public let timeoutMilliseconds: Int

    public init(servers: [SocketAddress], timeoutMilliseconds: Int) {
        self.servers = servers
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    public enum Failure: Error, Equatable, CustomStringConvertible {
        /// No resolver answered within the timeout.
        case timeout
        /// A resolver answered with something that is not a DNS answer to the query.
        case malformed(String)
        /// A socket call failed.
        case system(String, Int32)

        public var description: String {
            switch self {
            case .timeout: "no answer within the timeout"
            case .malformed(let why): "malformed answer: \(why)"
            case .system(let call, let code): "\(call): \(String(cString: strerror(code)))"
            }
        }
    }

    /// The answer for `name` and `type` from the first resolver that gives one (a SERVFAIL or
    /// NXDOMAIN is an answer: its rcode says so), and whether it came over TCP.
    public func resolve(_ name: String, type: UInt16) -> Result<(answer: DNSMessage.Answer, overTCP: Bool), Failure> {
        var last: Result<(answer: DNSMessage.Answer, overTCP: Bool), Failure> = .failure(.timeout)
        for server in servers {
            let id = UInt16.random(in: 0...UInt16.max)
            guard let query = DNSMessage.query(id: id, name: name, type: type) else { return .failure(.malformed("'\(name)' is not a DNS name")) }
            // One timeout for the server, UDP and TCP together.
            let end = monotonicMilliseconds() + Int64(timeoutMilliseconds)
            switch exchangeUDP(query, id: id, with: server, until: end) {
            case .success(let answer) where !answer.truncated:
                last = .success((answer, false))
            case .success:
                last = exchangeTCP(query, id: id, with: server, until: end).map { ($0, true) }
            case .failure(let failure):
                last = .failure(failure)
            }
            // SERVFAIL or REFUSED from one resolver: the next may do better.
            if case .success(let (answer, _)) = last, answer.rcode != 2, answer.rcode != 5 { return last }
        }
        return last
    }

    /// The resolvers of `/etc/resolv.conf` (its `nameserver` lines, port 53).
    public static func systemResolvers(path: String = "/etc/resolv.conf") -> [SocketAddress] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, fields[0] == "nameserver", let ip = SocketAddress.parseIP(String(fields[1])) else { return nil }
            return SocketAddress(ip: ip, port: 53)
        }
    }

    private func exchangeUDP(_ query: [UInt8], id: UInt16, with server: SocketAddress, until end: Int64) -> Result<DNSMessage.Answer, Failure> {
        let fd = socket(server.family == .inet ? AF_INET : AF_INET6, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.system("socket", errno)) }
        defer { close(fd) }
        var storage = sockaddr_storage()
        let length = server.write(to: &storage)
        let connected = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
        guard connected == 0 else { return .failure(.system("connect", errno)) }
        guard send(fd, query, query.count, 0) == query.count else { return .failure(.system("send", errno)) }
        var buffer = [UInt8](repeating: 0, count: 65535)
        while true {
            guard wait(fd, for: Int16(POLLIN), until: end) else { return .failure(.timeout) }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                return .failure(.system("recv", errno))  // ECONNREFUSED: nothing listens there
            }
            // A datagram of another ID is a stray (a late answer to an earlier query): wait on.
            guard n >= 4, UInt16(buffer[0]) << 8 | UInt16(buffer[1]) == id else { continue }
            do {
                return .success(try DNSMessage.parse(Array(buffer[..<n])))
            } catch {
                // Ours but unreadable: cut short by truncation goes to TCP, else it is an error.
                guard buffer[2] & 0x02 != 0 else { return .failure(.malformed(error.description)) }
                return .success(DNSMessage.Answer(id: id, rcode: buffer[3] & 0x0F, truncated: true, records: []))
            }
        }
    }

    private func exchangeTCP(_ query: [UInt8], id: UInt16, with server: SocketAddress, until end: Int64) -> Result<DNSMessage.Answer, Failure> {
        let fd = socket(server.family == .inet ? AF_INET : AF_INET6, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return .failure(.system("socket", errno)) }
        defer { close(fd) }
        var storage = sockaddr_storage()
        let length = server.write(to: &storage)
        let started = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
        if started != 0 {
            guard errno == EINPROGRESS else { return .failure(.system("connect", errno)) }
            guard wait(fd, for: Int16(POLLOUT), until: end) else { return .failure(.timeout) }
            var error: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size)
            guard error == 0 else { return .failure(.system("connect", error)) }
        }
        let framed = [UInt8(query.count >> 8), UInt8(query.count & 0xFF)] + query
        var sent = 0
        while sent < framed.count {
            guard wait(fd, for: Int16(POLLOUT), until: end) else { return .failure(.timeout) }
            let n = framed[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                return .failure(.system("send", errno))
            }
            sent += n
        }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            if received.count >= 2 {
                let size = Int(received[0]) << 8 | Int(received[1])
                if received.count >= 2 + size {
                    do {
                        let answer = try DNSMessage.parse(Array(received[2..<(2 + size)]))
                        guard answer.id == id else { return .failure(.malformed("ID \(answer.id) over TCP, expected \(id)")) }
                        return .success(answer)
                    } catch {
                        return .failure(.malformed(error.description))
                    }
                }
            }
            guard wait(fd, for: Int16(POLLIN), until: end) else { return .failure(.timeout) }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                return .failure(.system("recv", errno))
            }
            guard n > 0 else { return .failure(.malformed("the resolver closed the TCP connection after \(received.count) bytes")) }
            received += buffer[..<n]
        }
    }

    /// Waits for `events` on `fd` until `end` (monotonic ms); false when time ran out.
    private func wait(_ fd: Int32, for events: Int16, until end: Int64) -> Bool {
        while true {
            let left = end - monotonicMilliseconds()
            guard left > 0 else { return false }
            var entry = pollfd(fd: fd, events: events, revents: 0)
            let n = poll(&entry, 1, Int32(min(left, Int64(Int32.max))))
            if n > 0 { return true }
            if n < 0, errno != EINTR { return false }
        }
    }
}
