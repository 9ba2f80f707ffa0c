import CTestSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Traffic for the filter tests: connections and datagrams from chosen source addresses,
/// and what became of them.
enum FilterTraffic {
    enum Outcome: Equatable {
        /// Connected, and the echo came back through l4lb.
        case served
        /// No handshake completed (XDP dropped the SYNs).
        case noConnection
        /// The handshake completed but l4lb closed it before any byte came back (the
        /// user-space filter closes at accept).
        case closedBeforeData

        var blocked: Bool { self != .served }
    }

    /// One connection from `source` through an echoing backend.
    static func attempt(host: String, port: UInt16, source: String, timeout: TimeInterval = 1.2) -> Outcome {
        guard let fd = try? Sockets.connect(host: host, port: port, timeout: timeout, bindTo: source) else { return .noConnection }
        defer { close(fd) }
        Sockets.setTimeout(fd, seconds: 3)
        let probe = Array("filter-probe\n".utf8)
        guard (try? Sockets.sendAll(fd, probe)) != nil, let echoed = try? Sockets.receiveExactly(fd, probe.count), echoed == probe else {
            return .closedBeforeData
        }
        return .served
    }

    /// Opens `count` connections from `source` at once: how many completed the handshake
    /// within `timeout`. Every socket is closed before it returns.
    static func connectMany(host: String, port: UInt16, source: String, count: Int, timeout: TimeInterval) -> Int {
        let (target, length) = Sockets.sockaddr(host, port)
        let (local, localLength) = Sockets.sockaddr(source, 0)
        var fds: [Int32] = []
        defer { fds.forEach { close($0) } }
        for _ in 0..<count {
            let fd = socket(Int32(target.ss_family), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { continue }
            fds.append(fd)
            var l = local
            _ = withUnsafePointer(to: &l) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, localLength) } }
            var t = target
            _ = withUnsafePointer(to: &t) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
        }
        var connected = Set<Int32>()
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline, connected.count < fds.count {
            var polls = fds.filter { !connected.contains($0) }.map { pollfd(fd: $0, events: Int16(POLLOUT), revents: 0) }
            guard poll(&polls, nfds_t(polls.count), 50) > 0 else { continue }
            for p in polls where p.revents != 0 {
                var error: Int32 = 0
                var size = socklen_t(4)
                getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &error, &size)
                if error == 0, p.revents & Int16(POLLOUT) != 0 { connected.insert(p.fd) }
            }
        }
        return connected.count
    }

    /// A UDP socket bound to `host:port` (0 = any port) with a receive timeout.
    static func udpSocket(host: String, port: UInt16 = 0) throws -> Int32 {
        var (address, length) = Sockets.sockaddr(host, port)
        let fd = socket(Int32(address.ss_family), Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw Sockets.Failure("socket") }
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0 else { let e = errno; close(fd); throw Sockets.Failure("bind udp \(host):\(port)", e) }
        return fd
    }

    /// Sends `count` datagrams from `source` to `host:port`.
    static func sendDatagrams(from source: String, to host: String, port: UInt16, count: Int) throws {
        let fd = try udpSocket(host: source)
        defer { close(fd) }
        var (target, length) = Sockets.sockaddr(host, port)
        let payload = Array("datagram".utf8)
        for _ in 0..<count {
            _ = withUnsafePointer(to: &target) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, payload, payload.count, 0, $0, length) } }
        }
    }

    /// Reads what `fd` has received: datagrams until none arrives for `quiet`.
    static func receivedDatagrams(_ fd: Int32, quiet: TimeInterval = 0.3) -> Int {
        var count = 0
        var buffer = [UInt8](repeating: 0, count: 2048)
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, Int32(quiet * 1000)) == 1 else { return count }
            if recv(fd, &buffer, buffer.count, 0) > 0 { count += 1 }
        }
    }

    /// Sends a raw Ethernet frame (with any VLAN tags the caller built) out of `interface`.
    static func sendFrame(_ frame: [UInt8], on interface: String) throws {
        try sendFrames([frame], on: interface)
    }

    /// Frames of one length through one packet socket: opening and closing one costs an RCU
    /// grace period (~10 ms), so thousands of frames go in one batch.
    static func sendFrames(_ frames: [[UInt8]], on interface: String) throws {
        guard let length = frames.first?.count else { return }
        precondition(frames.allSatisfy { $0.count == length }, "sendFrames: frames of one length")
        let bytes = frames.flatMap { $0 }
        let rc = CTest_send_frames(interface, bytes, UInt32(length), UInt32(frames.count))
        guard rc == 0 else { throw Sockets.Failure("AF_PACKET send on \(interface)", -rc) }
    }

    /// An Ethernet frame carrying a UDP datagram from `source` to `destination` (IPv4 or
    /// IPv6 by the address), behind `tags` VLAN headers (TPID, VLAN id). `options`: IPv4
    /// option words (NOPs); `fragmentOffset` in 8-byte units (with `moreFragments`), an
    /// IPv6 fragment header when nonzero; `extensions`: IPv6 extension headers (hop-by-hop
    /// 0, destination options 60), 8 bytes each; `truncatedTo` cuts the frame.
    static func udpFrame(source: String, destination: String, port: UInt16, tags: [(tpid: UInt16, id: UInt16)] = [],
                         options: Int = 0, fragmentOffset: UInt16 = 0, moreFragments: Bool = false,
                         extensions: [UInt8] = [], truncatedTo: Int? = nil) -> [UInt8] {
        func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
        var frame: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01]
        for tag in tags { frame += be16(tag.tpid) + be16(tag.id) }
        let payload = Array("vlan-tagged".utf8)
        let udpLength = UInt16(8 + payload.count)
        let udp = be16(40000) + be16(port) + be16(udpLength) + [0, 0] + payload
        if destination.contains(":") {
            var s = [UInt8](repeating: 0, count: 16), d = s
            inet_pton(AF_INET6, source, &s)
            inet_pton(AF_INET6, destination, &d)
            var headers = extensions
            if fragmentOffset != 0 || moreFragments { headers.append(44) }
            var chain: [UInt8] = []
            for (i, kind) in headers.enumerated() {
                let next = i + 1 < headers.count ? headers[i + 1] : 17
                if kind == 44 {
                    chain += [next, 0] + be16(fragmentOffset << 3 | (moreFragments ? 1 : 0)) + [0, 0, 0, 1]
                } else {
                    chain += [next, 0, 1, 4, 0, 0, 0, 0]   // PadN over the rest
                }
            }
            let first = headers.first ?? 17
            frame += be16(0x86DD) + [0x60, 0, 0, 0] + be16(UInt16(chain.count) + udpLength) + [first, 64] + s + d + chain + udp
        } else {
            var s = [UInt8](repeating: 0, count: 4), d = s
            inet_pton(AF_INET, source, &s)
            inet_pton(AF_INET, destination, &d)
            let headerLength = 20 + 4 * options
            let flags = fragmentOffset | (moreFragments ? 0x2000 : 0)
            var ip: [UInt8] = [UInt8(0x40 | headerLength / 4), 0] + be16(UInt16(headerLength) + udpLength) + [0, 1] + be16(flags) + [64, 17, 0, 0] + s + d
            ip += [UInt8](repeating: 1, count: 4 * options)   // NOP options
            var sum: UInt32 = 0
            for i in stride(from: 0, to: headerLength, by: 2) { sum += UInt32(ip[i]) << 8 | UInt32(ip[i + 1]) }
            while sum > 0xFFFF { sum = (sum & 0xFFFF) + (sum >> 16) }
            let checksum = be16(~UInt16(sum))
            ip[10] = checksum[0]
            ip[11] = checksum[1]
            frame += be16(0x0800) + ip + udp
        }
        if let truncatedTo { frame = Array(frame.prefix(truncatedTo)) }
        return frame
    }
}

/// The `/stats` filter section.
extension Dictionary where Key == String, Value == Any {
    var filter: [String: Any] { self["filter"] as? [String: Any] ?? [:] }

    /// A verdict counter of the filter row for `interface` ("*" for user space).
    func filterCount(_ interface: String, dropped reason: String) -> Int {
        filterRow(interface)["dropped"].flatMap { ($0 as? [String: Any])?.int(reason) } ?? -1
    }

    func filterCount(_ interface: String, passed reason: String) -> Int {
        filterRow(interface)["passed"].flatMap { ($0 as? [String: Any])?.int(reason) } ?? -1
    }

    func filterRow(_ interface: String) -> [String: Any] {
        (filter["counters"] as? [[String: Any]] ?? []).first { $0["interface"] as? String == interface } ?? [:]
    }
}
