import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// `relay: kernel` (issue 13, must-show 7): a tc program on `lo` carries a session's
/// datagrams once its endpoint is picked. What users depend on stays as in user space:
/// datagrams whole, every one counted, idle expiry, ICMP failover, a full flow table
/// degrading to the user-space relay.
final class UDPKernelRelayTests: XCTestCase {
    func config(port: UInt16, endpoints: [String], host: String = "127.0.0.1", workers: Int = 2, extra: String = "", clusterExtra: String = "") -> String {
        let listen = host.contains(":") ? "\"[\(host)]:\(port)\"" : "\(host):\(port)"
        return """
            workers: \(workers)
            listeners:
              - { name: dns, address: \(listen), protocol: udp, cluster: udp, relay: kernel\(extra) }
            clusters:
              - name: udp
                endpoints: [\(endpoints.map { "{ address: \"\($0)\" }" }.joined(separator: ", "))]\(clusterExtra)
            """
    }

    func start(_ config: String, environment: [String: String] = [:]) throws -> L4LBProcess {
        let proxy = try L4LBProcess(config: config, waitFor: nil, environment: environment)
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        return proxy
    }

    func kernel(_ proxy: L4LBProcess) -> [String: Any] {
        ((try? proxy.stats())?.listener("dns")?["kernel_relay"] as? [String: Any]) ?? [:]
    }

    func testKernelRelayConfigErrorsNameTheField() throws {
        let base = """
            listeners:
              - { name: dns, address: 127.0.0.1:5353, protocol: udp, cluster: udp, relay: kernel, EXTRA }
              - { name: web, address: 127.0.0.1:8080, cluster: udp, relay: kernel }
            clusters:
              - { name: udp, endpoints: [ { address: 127.0.0.1:5354 } ] }
            """
        let cases: [(String, String)] = [
            ("session: none", "listeners[0].relay: kernel applies to session: client only"),
            ("proxy_responses: 1", "listeners[0].relay: kernel cannot count proxy_responses; leave it unset"),
            // The tcp listener's relay: kernel is the kernel forwarder's, which runs no round robin.
            ("max_sessions: 10", "listeners[1].relay: kernel runs maglev or random; cluster \"udp\" uses round_robin"),
        ]
        for (extra, expected) in cases {
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-relay-\(UUID().uuidString).yaml")
            try base.replacingOccurrences(of: "EXTRA", with: extra).write(to: url, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: url) }
            let (status, output) = try L4LBProcess.runCommand(["check", "--config", url.path])
            XCTAssertEqual(status, 2, output)
            XCTAssertTrue(output.contains(expected), "expected \"\(expected)\" in: \(output)")
        }
    }

    /// Must-show 2 through the kernel: 50 clients × 4 rounds of 1 to 65,507 random bytes
    /// come back byte-identical, one datagram each, over IPv4 and IPv6; every datagram is
    /// counted once, and all but each session's first datagram (and, over IPv6, the
    /// fragmented 65,507-byte ones the program leaves to the stack) went through the kernel.
    func testKernelRelayCarriesSessionsWholeAndCountsEveryDatagram() throws {
        let sizes = [1, 512, 1472, 9000, 65_507]
        let clientCount = 50, rounds = 4
        var random = SystemRandomNumberGenerator()
        // Generated before any is sent: a slow draw must not stretch a round past idle_timeout.
        let payloads = sizes.map { size in (0..<4).map { _ in (0..<size).map { _ in UInt8.random(in: 0...255, using: &random) } } }
        for host in ["127.0.0.1", "::1"] {
            let backend = try UDPBackend(.echo, host: host)
            defer { backend.stop() }
            let port = Sockets.freePort()
            let proxy = try start(config(port: port, endpoints: [backend.address], host: host, extra: ", idle_timeout: 20s"))
            defer { proxy.stop() }
            let clients = try (0..<clientCount).map { _ in try UDPClient.connect(host: host, port: port) }
            defer { clients.forEach { close($0) } }
            var wrong = 0, bytes = 0
            for round in 0..<rounds {
                for (s, size) in sizes.enumerated() {
                    for (i, fd) in clients.enumerated() {
                        let payload = payloads[s][(i + round) % 4]
                        if UDPClient.exchange(fd, payload) != payload { wrong += 1 }
                        bytes += size
                    }
                }
            }
            XCTAssertEqual(wrong, 0, "datagrams that did not come back whole over \(host)")
            let total = clientCount * rounds * sizes.count
            let fragmented = host == "::1" ? clientCount * rounds : 0
            // The kernel's counts reach the stats within a second.
            XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_out"] as? Int) == total - fragmented },
                          "over \(host): \(self.kernel(proxy))")
            let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
            XCTAssertEqual(listener.int("total"), clientCount, "one session per client over \(host)")
            XCTAssertEqual(listener.int("idle_timeouts"), 0)
            XCTAssertEqual(listener.int("datagrams_in"), total)
            XCTAssertEqual(listener.int("datagrams_out"), total)
            XCTAssertEqual(listener.int("bytes_in"), bytes)
            XCTAssertEqual(listener.int("bytes_out"), bytes)
            XCTAssertEqual(listener.int("datagram_drops"), 0)
            let carried = kernel(proxy)
            XCTAssertEqual(carried["sessions"] as? Int, clientCount)
            XCTAssertEqual(carried["datagrams_in"] as? Int, total - clientCount - fragmented, "over \(host)")
            XCTAssertEqual(carried["fallbacks"] as? Int, 0)
            XCTAssertEqual(backend.sources, clientCount, "one upstream socket per session")
        }
    }

    /// Must-show 5 through the kernel: a session the kernel carries stays alive past
    /// idle_timeout while it has traffic (the worker never sees it); killing one of three
    /// backends moves its sessions after the ICMP error with at most the datagram in
    /// flight lost, and the other sessions stay where they were.
    func testKernelRelayedSessionsFollowTrafficAndMoveOnICMP() throws {
        let backends = try (0..<3).map { try UDPBackend(.identify("backend-\($0)")) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        let proxy = try start(config(port: port, endpoints: backends.map(\.address), workers: 1, extra: ", idle_timeout: 1s",
                                     clusterExtra: "\n    outlier_detection: { consecutive_failures: 1, ejection_time: 30s }"))
        defer { proxy.stop() }
        let clients = try (0..<30).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port, timeout: 0.5) }
        defer { clients.forEach { close($0) } }
        let before = clients.map { UDPClient.exchange($0, Array("hello".utf8)).map { String(decoding: $0, as: UTF8.self) } ?? "none" }
        XCTAssertEqual(Set(before), ["backend-0", "backend-1", "backend-2"])
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, 30)

        // Three idle_timeouts of traffic the worker never sees: no session expires or moves.
        let start = Date()
        var moved = 0
        while Date().timeIntervalSince(start) < 3 {
            for (i, fd) in clients.enumerated() where UDPClient.exchange(fd, [1]).map({ String(decoding: $0, as: UTF8.self) }) != before[i] { moved += 1 }
            usleep(100_000)
        }
        XCTAssertEqual(moved, 0)
        var listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("idle_timeouts"), 0, "sessions with kernel traffic expired")
        XCTAssertEqual(listener.int("total"), 30)

        backends[2].stop()
        // In passes, every client that has no reply yet sending before any waits for one,
        // so that no live session sits idle past idle_timeout while the moved ones retry.
        var replies = [String?](repeating: nil, count: clients.count)
        var attempts = [Int](repeating: 0, count: clients.count)
        var buffer = [UInt8](repeating: 0, count: 2048)
        for _ in 0..<10 where replies.contains(nil) {
            let waiting = clients.indices.filter { replies[$0] == nil }
            for i in waiting {
                attempts[i] += 1
                let payload = Array("after \(attempts[i])".utf8)
                XCTAssertEqual(send(clients[i], payload, payload.count, 0), payload.count)
            }
            for i in waiting {
                let n = recv(clients[i], &buffer, buffer.count, 0)
                if n > 0 { replies[i] = String(decoding: buffer[..<n], as: UTF8.self) }
            }
        }
        for i in clients.indices {
            if before[i] == "backend-2" {
                XCTAssertNotNil(replies[i], "client \(i) never reached a live endpoint")
                XCTAssertNotEqual(replies[i], "backend-2")
                // Only the datagram in flight when the endpoint died.
                XCTAssertLessThanOrEqual(attempts[i] - 1, 1, "client \(i) lost \(attempts[i] - 1) datagrams")
            } else {
                XCTAssertEqual(replies[i], before[i], "client \(i)'s session moved")
                XCTAssertEqual(attempts[i], 1, "client \(i) lost a datagram")
            }
        }
        let onDead = before.filter { $0 == "backend-2" }.count
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("total"), 30 + onDead, "each moved client opened one new session")
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, 30 + onDead, "the new sessions are the kernel's too")
    }

    /// At scale: 2,000 sessions from 2,000 sockets over 2 workers, all carried by the
    /// kernel, every datagram counted; all expire after idle_timeout, and their flows go
    /// with them (a client's next datagram reaches the worker and opens a new session).
    func testThousandsOfKernelSessionsCountExactlyAndExpire() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let proxy = try start(config(port: port, endpoints: [backend.address], extra: ", idle_timeout: 3s"))
        defer { proxy.stop() }
        let count = 2_000, rounds = 5
        let clients = try (0..<count).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
        defer { clients.forEach { close($0) } }
        var wrong = 0
        for round in 0..<rounds {
            for (i, fd) in clients.enumerated() {
                let payload = Array("\(i):\(round)".utf8)
                if UDPClient.exchange(fd, payload) != payload { wrong += 1 }
            }
        }
        XCTAssertEqual(wrong, 0)
        let total = count * rounds
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_out"] as? Int) == total }, "\(kernel(proxy))")
        var listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_in"), total)
        XCTAssertEqual(listener.int("datagrams_out"), total)
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, count)
        XCTAssertEqual(kernel(proxy)["datagrams_in"] as? Int, total - count)
        // Idle now: all expire (the kernel saw nothing more), within two idle checks.
        XCTAssertTrue(waitUntil(timeout: 12) { (try? proxy.stats())?.listener("dns")?.int("active") == 0 },
                      "\(String(describing: try? proxy.stats().listener("dns")))")
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("idle_timeouts"), count)
        // The flows went with the sessions: these datagrams reach a worker again.
        for fd in clients.prefix(100) { XCTAssertEqual(UDPClient.exchange(fd, [9]), [9]) }
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("total"), count + 100)
        XCTAssertEqual(listener.int("active"), 100)
    }

    /// A full flow table degrades, never fails: with room for 41 sessions, 101 clients
    /// are all served and counted, 41 through the kernel and 60 in user space (counted as
    /// fallbacks). A datagram with IP options on a kernel session (the program leaves it
    /// to the stack) still arrives whole, through the worker.
    func testAFullFlowTableLeavesSessionsInUserSpace() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let proxy = try start(config(port: port, endpoints: [backend.address], extra: ", idle_timeout: 20s"),
                              environment: ["L4LB_UDP_RELAY_FLOWS": "82"])
        defer { proxy.stop() }
        let withOptions = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(withOptions) }
        XCTAssertEqual(UDPClient.exchange(withOptions, [5]), [5])
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, 1)
        let clients = try (0..<100).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
        defer { clients.forEach { close($0) } }
        var wrong = 0
        for round in 0..<10 {
            for (i, fd) in clients.enumerated() {
                let payload = Array("\(i):\(round)".utf8)
                if UDPClient.exchange(fd, payload) != payload { wrong += 1 }
            }
        }
        XCTAssertEqual(wrong, 0)
        // 40 sessions × 10 replies, and the first client's one.
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_out"] as? Int) == 401 }, "\(kernel(proxy))")
        var carried = kernel(proxy)
        XCTAssertEqual(carried["sessions"] as? Int, 41)
        XCTAssertEqual(carried["fallbacks"] as? Int, 60)
        XCTAssertEqual(carried["datagrams_in"] as? Int, 360)
        var listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("active"), 101)
        XCTAssertEqual(listener.int("datagrams_in"), 1001)
        XCTAssertEqual(listener.int("datagrams_out"), 1001)

        // IP options (four NOPs) move the UDP header: the program passes the datagram up,
        // and the worker relays it on the session's socket; the reply comes back through
        // the kernel.
        var options: [UInt8] = [1, 1, 1, 1]
        XCTAssertEqual(setsockopt(withOptions, Int32(IPPROTO_IP), IP_OPTIONS, &options, 4), 0)
        let payload = [UInt8](repeating: 0xAB, count: 3000)
        XCTAssertEqual(UDPClient.exchange(withOptions, payload), payload)
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_out"] as? Int) == 402 }, "\(kernel(proxy))")
        carried = kernel(proxy)
        XCTAssertEqual(carried["datagrams_in"] as? Int, 360, "the datagram with options went through the worker")
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_in"), 1002)
        XCTAssertEqual(listener.int("active"), 101)
    }

    /// Must-show 6 on the kernel's path: 1,000,000 datagrams from four clients at a
    /// backend slower than the flood, on one worker. Once the four sessions are the
    /// kernel's, the flood never reaches the worker: every datagram is counted (the
    /// kernel's counts, or the loopback backlog's drops before it), nothing is dropped by
    /// the worker, its RSS stays bounded, and TCP through the same worker keeps flowing.
    func testAFloodOnKernelSessionsNeverReachesTheWorker() throws {
        let slow = try UDPBackend(.slowEcho(microseconds: 50))
        defer { slow.stop() }
        let echo = try TestBackend(.echo)
        defer { echo.stop() }
        let udpPort = Sockets.freePort(), tcpPort = Sockets.freePort()
        let proxy = try L4LBProcess(config: UDPFlood.config("dns", udpPort: udpPort, tcpPort: tcpPort, slow: slow, echo: echo, extra: ", relay: kernel"),
                                    waitFor: ("127.0.0.1", tcpPort))
        defer { proxy.stop() }
        let senders = 4, total = 1_000_000
        let clients = try (0..<senders).map { _ in try UDPClient.connect(host: "127.0.0.1", port: udpPort) }
        defer { clients.forEach { close($0) } }
        // The first datagram opens each session and hands it to the kernel.
        for fd in clients { XCTAssertNotNil(UDPClient.exchange(fd, [0])) }
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, senders)
        let rssBefore = proxy.resources.rssKiB
        let cpuBefore = proxy.cpuSeconds
        let backlogDropsBefore = UDPScaleTests.backlogDrops()

        let (done, sentCount) = UDPFlood.start(clients, total: total)
        let (roundTrips, slowest) = try UDPFlood.roundTrips(port: tcpPort, until: done)
        let backlog = UDPScaleTests.backlogDrops() - backlogDropsBefore
        XCTAssertEqual(sentCount.value, total)
        // Everything that got past the loopback backlog went through the program (and is
        // folded into the stats within a second).
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_in"] as? Int ?? 0) + backlog == total },
                      "kernel \(kernel(proxy)), backlog drops \(backlog)")
        let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_in"), total - backlog + senders)
        XCTAssertEqual(listener.int("datagram_drops"), 0, "nothing reached the worker to drop")
        XCTAssertEqual(listener.int("active"), senders)
        XCTAssertLessThan(slow.received, total, "the backend is slower than the flood")
        XCTAssertGreaterThan(roundTrips, 20, "TCP kept flowing")
        XCTAssertLessThan(slowest, 1.0, "no TCP round trip waited a second")
        // What it touched is TCP's buffers for the round trips; the user-space relay's
        // datagram pool alone is 16 MiB.
        XCTAssertLessThan(proxy.resources.rssKiB - rssBefore, 12 * 1024, "RSS bounded")
        print("kernel flood: \(total) sent, \(backlog) dropped in the loopback backlog, backend answered \(slow.received); " +
              "l4lb CPU \(String(format: "%.2f", proxy.cpuSeconds - cpuBefore)) s; TCP \(roundTrips) round trips, slowest \(Int(slowest * 1000)) ms")
    }

    /// A reload to `relay: user` takes the kernel's sessions back without ending them:
    /// each keeps its endpoint, and its datagrams go through the worker again (counted
    /// there); a reload back to `kernel` hands over only the sessions it opens.
    func testAReloadTakesSessionsBackFromTheKernel() throws {
        let backends = try (0..<3).map { try UDPBackend(.identify("backend-\($0)")) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        let kernelConfig = config(port: port, endpoints: backends.map(\.address), workers: 1, extra: ", idle_timeout: 30s")
        let proxy = try start(kernelConfig)
        defer { proxy.stop() }
        let clients = try (0..<12).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
        defer { clients.forEach { close($0) } }
        let before = clients.map { UDPClient.exchange($0, [1]).map { String(decoding: $0, as: UTF8.self) } ?? "none" }
        for fd in clients { _ = UDPClient.exchange(fd, [2]) }
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_in"] as? Int) == 12 }, "\(kernel(proxy))")

        try proxy.writeConfig(kernelConfig.replacingOccurrences(of: "relay: kernel", with: "relay: user"))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        let after = clients.map { UDPClient.exchange($0, [3]).map { String(decoding: $0, as: UTF8.self) } ?? "none" }
        XCTAssertEqual(after, before, "every session kept its endpoint")
        var listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("total"), 12, "no session ended")
        XCTAssertEqual(listener.int("datagrams_in"), 36)
        XCTAssertEqual(listener.int("datagrams_out"), 36)
        XCTAssertEqual(listener["relay"] as? String, "user")

        try proxy.writeConfig(kernelConfig)
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        let newcomer = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(newcomer) }
        XCTAssertNotNil(UDPClient.exchange(newcomer, [4]))
        XCTAssertNotNil(UDPClient.exchange(newcomer, [5]))
        for fd in clients { _ = UDPClient.exchange(fd, [6]) }
        XCTAssertTrue(waitUntil(timeout: 5) { (self.kernel(proxy)["datagrams_in"] as? Int) == 13 }, "\(kernel(proxy))")
        XCTAssertEqual(kernel(proxy)["sessions"] as? Int, 13, "only the new session went to the kernel")
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_in"), 50)
        XCTAssertEqual(listener.int("datagrams_out"), 50)
    }

    /// `max_sessions` evicts the longest idle session counting what the kernel carried:
    /// the oldest session, busy only in the kernel, stays; an idle one goes.
    func testMaxSessionsEvictsTheLongestIdleCountingKernelTraffic() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let proxy = try start(config(port: port, endpoints: [backend.address], workers: 1, extra: ", idle_timeout: 30s, max_sessions: 3"))
        defer { proxy.stop() }
        let busy = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(busy) }
        XCTAssertEqual(UDPClient.exchange(busy, [1]), [1])
        let idle = try (0..<2).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
        defer { idle.forEach { close($0) } }
        for fd in idle { XCTAssertEqual(UDPClient.exchange(fd, [2]), [2]) }
        // The busy client keeps talking, through the kernel only, past a fold.
        let start = Date()
        while Date().timeIntervalSince(start) < 1.5 {
            XCTAssertEqual(UDPClient.exchange(busy, [3]), [3])
            usleep(50_000)
        }
        let newcomer = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(newcomer) }
        XCTAssertEqual(UDPClient.exchange(newcomer, [4]), [4])
        var listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("sessions_evicted"), 1)
        XCTAssertEqual(listener.int("total"), 4)
        // The busy client's session was kept: its next datagram opens nothing.
        XCTAssertEqual(UDPClient.exchange(busy, [5]), [5])
        listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("total"), 4, "the busy session was evicted")
        XCTAssertEqual(listener.int("active"), 3)
    }
}
