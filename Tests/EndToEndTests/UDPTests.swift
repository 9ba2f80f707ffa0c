import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// UDP listeners (issue 13): sessions per client address relayed through connected
/// upstream sockets, datagrams kept whole, replies from the listener's address.
final class UDPTests: XCTestCase {
    func udpConfig(port: UInt16, endpoints: [String], host: String = "127.0.0.1", workers: Int = 2,
                   balancer: String = "round_robin", listenerExtra: String = "") -> String {
        let listen = host.contains(":") ? "\"[\(host)]:\(port)\"" : "\(host):\(port)"
        return """
            workers: \(workers)
            listeners:
              - { name: dns, address: \(listen), protocol: udp, cluster: udp\(listenerExtra) }
            clusters:
              - name: udp
                balancer: \(balancer)
                endpoints: [\(endpoints.map { "{ address: \"\($0)\" }" }.joined(separator: ", "))]
            """
    }

    func client(_ host: String, _ port: UInt16, source: String? = nil) throws -> Int32 {
        try UDPClient.connect(host: host, port: port, source: source)
    }

    func exchange(_ fd: Int32, _ payload: [UInt8]) -> [UInt8]? { UDPClient.exchange(fd, payload) }

    /// Must-show 1: DNS through l4lb to Debian's nsd (RRL off): 10,000 queries from 20
    /// client sockets, every answer correct and back at the socket that asked; over IPv4
    /// and IPv6.
    func testDNSThroughL4LBToNSD() throws {
        let nsd = try NSDServer()
        for host in ["127.0.0.1", "::1"] {
            let port = Sockets.freePort()
            let upstream = host.contains(":") ? "[::1]:\(nsd.port)" : "127.0.0.1:\(nsd.port)"
            let proxy = try L4LBProcess(config: udpConfig(port: port, endpoints: [upstream], host: host), waitFor: nil)
            defer { proxy.stop() }
            XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
            let sockets = try (0..<20).map { _ in try client(host, port) }
            defer { sockets.forEach { close($0) } }
            var wrong = 0, unanswered = 0
            for q in 0..<10_000 {
                // Each socket's queries carry its own id range, so an answer that reached
                // the wrong socket would show.
                let socketIndex = q % 20
                let id = UInt16(socketIndex * 3000 + q / 20)
                let n = q % 100
                let fd = sockets[socketIndex]
                guard let reply = exchange(fd, DNS.query(id: id, name: "host\(n).example.test")), let answer = DNS.answer(reply) else {
                    unanswered += 1
                    continue
                }
                if answer.id != id || answer.rcode != 0 || answer.address != "192.0.2.\(n + 1)" { wrong += 1 }
            }
            XCTAssertEqual(unanswered, 0, "over \(host)")
            XCTAssertEqual(wrong, 0, "over \(host)")
            let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
            XCTAssertEqual(listener.int("datagrams_in"), 10_000)
            XCTAssertEqual(listener.int("datagrams_out"), 10_000)
            XCTAssertEqual(listener.int("active"), 20, "one session per client socket")
        }
    }

    /// Must-show 2: random payloads of 1 to 65,507 bytes come back byte-identical, one
    /// datagram each (never merged or split), over IPv4 and IPv6.
    func testDatagramsOfEverySizeComeBackWhole() throws {
        for host in ["127.0.0.1", "::1"] {
            let backend = try UDPBackend(.echo, host: host)
            defer { backend.stop() }
            let port = Sockets.freePort()
            let proxy = try L4LBProcess(config: udpConfig(port: port, endpoints: [backend.address], host: host), waitFor: nil)
            defer { proxy.stop() }
            XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
            let fd = try client(host, port)
            defer { close(fd) }
            var random = SystemRandomNumberGenerator()
            XCTAssertTrue(waitUntil(timeout: 5) { self.exchange(fd, [1]) == [1] }, "no echo through l4lb: \(proxy.log)")
            for size in [1, 512, 1472, 9000, 65_507, 2, 65_507] {
                let payload = (0..<size).map { _ in UInt8.random(in: 0...255, using: &random) }
                XCTAssertTrue(exchange(fd, payload) == payload, "\(size) bytes over \(host) did not come back intact")
            }
            // Ten datagrams sent back to back arrive as ten, in order, each whole.
            let burst = (0..<10).map { i in [UInt8](repeating: UInt8(i), count: 1000 + i) }
            for payload in burst { XCTAssertEqual(send(fd, payload, payload.count, 0), payload.count) }
            var buffer = [UInt8](repeating: 0, count: 65_536)
            for payload in burst {
                let n = recv(fd, &buffer, buffer.count, 0)
                XCTAssertEqual(n, payload.count)
                if n == payload.count { XCTAssertEqual(Array(buffer[..<n]), payload) }
            }
            let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
            XCTAssertEqual(listener["protocol"] as? String, "udp")
            XCTAssertEqual(listener.int("active"), 1, "one client, one session")
            XCTAssertEqual(listener.int("datagrams_in"), listener.int("datagrams_out"))
            XCTAssertEqual(backend.sources, 1, "one session, one upstream socket")
        }
    }

    /// Issue 34, must-show 4: a zero-length datagram is a datagram. Each way, first in a
    /// session and within one, over IPv4 and IPv6, through the user-space relay and the
    /// kernel's: it arrives, and `datagrams_in`/`datagrams_out` count it.
    func testZeroLengthDatagramsArriveBothWaysAndAreCounted() throws {
        for (host, relay) in [("127.0.0.1", "user"), ("::1", "user"), ("127.0.0.1", "kernel")] {
            let backend = try UDPBackend(.echo, host: host)
            defer { backend.stop() }
            let port = Sockets.freePort()
            let proxy = try L4LBProcess(config: udpConfig(port: port, endpoints: [backend.address], host: host, listenerExtra: ", relay: \(relay)"),
                                        waitFor: nil)
            defer { proxy.stop() }
            XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
            // Empty first: it opens the session, and the empty reply comes back through it.
            let first = try client(host, port)
            defer { close(first) }
            XCTAssertEqual(exchange(first, []), [], "an empty datagram opening a session over \(host) (\(relay)) got no empty reply")
            XCTAssertEqual(exchange(first, [7]), [7])
            let other = try client(host, port)
            defer { close(other) }
            XCTAssertEqual(exchange(other, [1, 2, 3]), [1, 2, 3])
            for round in 0..<20 {
                XCTAssertEqual(exchange(other, []), [], "empty datagram \(round) within a session over \(host) (\(relay))")
                XCTAssertEqual(exchange(other, [UInt8(round)]), [UInt8(round)])
            }
            XCTAssertEqual(backend.received, 43, "every datagram reached the endpoint, the empty ones too")
            // Counts: user space at once; the kernel's folded within a second or two.
            XCTAssertTrue(waitUntil(timeout: 5) {
                guard let listener = try? proxy.stats().listener("dns") else { return false }
                return listener.int("datagrams_in") == 43 && listener.int("datagrams_out") == 43
            }, "datagrams not counted over \(host) (\(relay)): \(String(describing: try? proxy.stats().listener("dns")))")
        }
    }

    /// Must-show 3 (one instance): 200 clients (200 source addresses) × 50 datagrams over
    /// 2 workers with Maglev by source address: every client always reaches the same
    /// endpoint, and the clients spread over all three.
    func testMaglevKeepsEveryClientOnOneEndpoint() throws {
        let backends = try (0..<3).map { try UDPBackend(.identify("backend-\($0)")) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: udpConfig(port: port, endpoints: backends.map(\.address), balancer: "maglev"), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        let clients = try (0..<200).map { i in try client("127.0.0.1", port, source: "127.1.\(i / 200).\(i % 200 + 1)") }
        defer { clients.forEach { close($0) } }
        var seen: [Set<String>] = Array(repeating: [], count: clients.count)
        for round in 0..<50 {
            for (i, fd) in clients.enumerated() {
                guard let reply = exchange(fd, Array("round \(round)".utf8)) else {
                    XCTFail("client \(i) got no reply in round \(round)")
                    continue
                }
                seen[i].insert(String(decoding: reply, as: UTF8.self))
            }
        }
        XCTAssertTrue(seen.allSatisfy { $0.count == 1 }, "clients that moved: \(seen.enumerated().filter { $0.element.count != 1 }.map(\.offset))")
        let spread = Dictionary(grouping: seen.compactMap(\.first), by: { $0 }).mapValues(\.count)
        XCTAssertEqual(spread.count, 3, "all endpoints used: \(spread)")
        XCTAssertEqual(try proxy.stats().listener("dns")?.int("active"), 200)
    }

    /// Must-show 4 (at this machine's descriptor limit): 2,000 sessions all expire after
    /// idle_timeout (none before: the table holds them all once they are open), counted,
    /// and their upstream sockets are closed.
    func testSessionsExpireAfterIdleTimeout() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: udpConfig(port: port, endpoints: [backend.address], listenerExtra: ", idle_timeout: 4s"), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        let descriptorsBefore = proxy.resources.descriptors
        let count = 2_000
        var clients: [Int32] = []
        let opening = Date()
        for _ in 0..<count {
            let fd = try client("127.0.0.1", port)
            clients.append(fd)
            XCTAssertEqual(exchange(fd, [7]), [7])
        }
        defer { clients.forEach { close($0) } }
        // Judged only if opening them all took less than idle_timeout (a slow machine could
        // take longer; then the first ones have legitimately expired).
        if Date().timeIntervalSince(opening) < 3.5 {
            XCTAssertEqual(try proxy.stats().listener("dns")?.int("active"), count)
        }
        // One socket per session (give or take the admin API's own connection).
        XCTAssertGreaterThanOrEqual(proxy.resources.descriptors - descriptorsBefore, count - 2)
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats())?.listener("dns")?.int("active") == 0 })
        let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("idle_timeouts"), count)
        XCTAssertLessThanOrEqual(proxy.resources.descriptors, descriptorsBefore + 2)
    }

    /// Must-show 5: killing one of three backends. Its sessions end on the ICMP port
    /// unreachable their next datagram brings back, outlier detection ejects it, and those
    /// clients' next datagram reaches a live endpoint; sessions on the others are untouched;
    /// only the datagrams in flight to the dead one are lost.
    func testAKilledBackendsSessionsMoveAfterTheICMPError() throws {
        let backends = try (0..<3).map { try UDPBackend(.identify("backend-\($0)")) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        var config = udpConfig(port: port, endpoints: backends.map(\.address), workers: 1)
        config += "\n    outlier_detection: { consecutive_failures: 1, ejection_time: 30s }"
        let proxy = try L4LBProcess(config: config, waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        let clients = try (0..<30).map { _ in try client("127.0.0.1", port) }
        defer { clients.forEach { close($0) } }
        let before = clients.map { fd in exchange(fd, Array("hello".utf8)).map { String(decoding: $0, as: UTF8.self) } ?? "none" }
        XCTAssertEqual(Set(before), ["backend-0", "backend-1", "backend-2"])

        backends[2].stop()
        var lost = 0
        for (i, fd) in clients.enumerated() {
            Sockets.setTimeout(fd, seconds: 0.5)
            var reply: String?
            var attempts = 0
            while reply == nil, attempts < 10 {
                attempts += 1
                reply = exchange(fd, Array("after \(attempts)".utf8)).map { String(decoding: $0, as: UTF8.self) }
            }
            if before[i] == "backend-2" {
                XCTAssertNotNil(reply, "client \(i) never reached a live endpoint")
                XCTAssertNotEqual(reply, "backend-2")
                // Only the datagram in flight when the endpoint died.
                XCTAssertLessThanOrEqual(attempts - 1, 1, "client \(i) lost \(attempts - 1) datagrams")
                lost += attempts - 1
            } else {
                XCTAssertEqual(reply, before[i], "client \(i)'s session moved")
                XCTAssertEqual(attempts, 1, "client \(i) lost a datagram")
            }
        }
        let dead = try XCTUnwrap(try proxy.stats().endpoint(cluster: "udp", address: backends[2].address))
        XCTAssertGreaterThanOrEqual(dead.int("connect_failures"), 1)
        XCTAssertEqual(dead.bool("ejected"), true)
        print("killed UDP backend: \(before.filter { $0 == "backend-2" }.count) sessions moved, \(lost) datagrams lost")
    }
}
