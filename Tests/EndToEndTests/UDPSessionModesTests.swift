import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// UDP session modes and checks (issue 13): `proxy_responses` ends a session after N
/// replies, `session: none` balances every datagram on its own through pooled upstream
/// sockets, and UDP clusters are health-checked over UDP (`send_expect`, `dns`).
final class UDPSessionModesTests: XCTestCase {
    func config(port: UInt16, endpoints: [String], workers: Int = 2, balancer: String = "round_robin",
                listenerExtra: String = "", clusterExtra: String = "") -> String {
        """
        workers: \(workers)
        listeners:
          - { name: dns, address: 127.0.0.1:\(port), protocol: udp, cluster: udp\(listenerExtra) }
        clusters:
          - name: udp
            balancer: \(balancer)
            endpoints: [\(endpoints.map { "{ address: \"\($0)\" }" }.joined(separator: ", "))]
        \(clusterExtra)
        """
    }

    func exchange(_ fd: Int32, _ payload: [UInt8]) -> [UInt8]? { UDPClient.exchange(fd, payload) }

    /// `proxy_responses: 1` (as nginx's: replies expected per client datagram): a session
    /// ends once every datagram has its reply, and the client's next datagram opens a new
    /// one. Two queries sent back to back (a resolver's A and AAAA) both get their answer.
    func testProxyResponsesEndsTheSessionWhenEveryDatagramIsAnswered() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(port: port, endpoints: [backend.address], listenerExtra: ", proxy_responses: 1"), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        let fd = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(fd) }
        for i in 0..<30 {
            let payload = Array("query \(i)".utf8)
            XCTAssertEqual(exchange(fd, payload), payload, "datagram \(i)")
        }
        XCTAssertTrue(waitUntil(timeout: 5) { (try? proxy.stats())?.listener("dns")?.int("active") == 0 })
        XCTAssertEqual(try proxy.stats().listener("dns")?.int("total"), 30, "one session per answered query")
        var buffer = [UInt8](repeating: 0, count: 64)
        for round in 0..<20 {
            let a = Array("A \(round)".utf8), aaaa = Array("AAAA \(round)".utf8)
            XCTAssertEqual(send(fd, a, a.count, 0), a.count)
            XCTAssertEqual(send(fd, aaaa, aaaa.count, 0), aaaa.count)
            var answers: Set<[UInt8]> = []
            for _ in 0..<2 {
                let n = recv(fd, &buffer, buffer.count, 0)
                if n > 0 { answers.insert(Array(buffer[..<n])) }
            }
            XCTAssertEqual(answers, [a, aaaa], "round \(round): both queries answered")
        }
        let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_out"), 70)
        XCTAssertEqual(listener.int("idle_timeouts"), 0)
    }

    /// `session: none`: 20 client sockets send 30 rounds of datagrams all at once. Every
    /// reply reaches the socket that asked, with its own payload; the datagrams spread over
    /// the three endpoints; one client's datagrams in a row go to different endpoints; and
    /// the upstream sockets are pooled: a few dozen serve the 630 datagrams.
    func testPerPacketModeBalancesEachDatagramAndAnswersTheAsker() throws {
        let backends = try (0..<3).map { try UDPBackend(.tag("backend-\($0)")) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(port: port, endpoints: backends.map(\.address), listenerExtra: ", session: none"), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)

        let single = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(single) }
        var reached: [String] = []
        for i in 0..<30 {
            guard let reply = exchange(single, Array("alone \(i)".utf8)).map({ String(decoding: $0, as: UTF8.self) }) else {
                XCTFail("no reply to datagram \(i)")
                continue
            }
            XCTAssertTrue(reply.hasSuffix(":alone \(i)"), reply)
            reached.append(String(reply.prefix { $0 != ":" }))
        }
        XCTAssertEqual(Set(reached).count, 3, "one client's datagrams are balanced one by one: \(reached)")

        let clients = try (0..<20).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
        defer { clients.forEach { close($0) } }
        var perBackend: [String: Int] = [:]
        var wrong = 0, missing = 0
        var buffer = [UInt8](repeating: 0, count: 2048)
        for round in 0..<30 {
            for (i, fd) in clients.enumerated() {
                let payload = Array("client \(i) round \(round)".utf8)
                XCTAssertEqual(send(fd, payload, payload.count, 0), payload.count)
            }
            for (i, fd) in clients.enumerated() {
                let n = recv(fd, &buffer, buffer.count, 0)
                guard n > 0 else {
                    missing += 1
                    continue
                }
                let reply = String(decoding: buffer[..<n], as: UTF8.self)
                guard let colon = reply.firstIndex(of: ":"), reply[reply.index(after: colon)...] == "client \(i) round \(round)" else {
                    wrong += 1
                    continue
                }
                perBackend[String(reply[..<colon]), default: 0] += 1
            }
        }
        XCTAssertEqual(missing, 0)
        XCTAssertEqual(wrong, 0, "replies that reached another client")
        XCTAssertEqual(perBackend.count, 3, "\(perBackend)")
        for (name, count) in perBackend { XCTAssertGreaterThan(count, 100, "\(name) got \(count) of 600: \(perBackend)") }
        let sockets = backends.map(\.sources).reduce(0, +)
        XCTAssertLessThanOrEqual(sockets, 2 * 3 * 20, "upstream sockets used for 630 datagrams")
        print("per-packet: 630 datagrams over \(sockets) pooled upstream sockets, spread \(perBackend)")
        XCTAssertTrue(waitUntil(timeout: 5) { (try? proxy.stats())?.listener("dns")?.int("active") == 0 }, "leases end with their reply")
        let listener = try XCTUnwrap(try proxy.stats().listener("dns"))
        XCTAssertEqual(listener.int("datagrams_in"), 630)
        XCTAssertEqual(listener.int("datagrams_out"), 630)
    }

    /// `send_expect` over UDP (hex payload, expected prefix): both echo endpoints pass; a
    /// stopped one (ICMP port unreachable) and one that never answers (timeout) go
    /// unhealthy, and new sessions avoid them.
    func testSendExpectOverUDPFindsDeadAndSilentEndpoints() throws {
        let alive = try UDPBackend(.echo)
        let dying = try UDPBackend(.echo)
        defer { alive.stop(); dying.stop() }
        // Bound, never read: datagrams to it vanish without an ICMP error.
        let (silent, silentAddress) = try UDPBackend.silent()
        defer { close(silent) }

        let port = Sockets.freePort()
        let check = "    health_check: { type: send_expect, send_hex: \"deadbeef01\", expect_hex: \"deadbeef\", interval: 100ms, timeout: 200ms, unhealthy_threshold: 2 }"
        let proxy = try L4LBProcess(config: config(port: port, endpoints: [alive.address, dying.address, silentAddress], clusterExtra: check), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        func healthy(_ address: String) -> Bool? { (try? proxy.stats())?.endpoint(cluster: "udp", address: address)?.bool("healthy") }
        XCTAssertTrue(waitUntil(timeout: 5) { healthy(alive.address) == true && healthy(dying.address) == true })
        XCTAssertEqual(healthy(silentAddress), false, "an endpoint that never answers")
        XCTAssertGreaterThan(alive.received, 0, "the check's datagrams reach the endpoint")

        dying.stop()
        let stopped = Date()
        XCTAssertTrue(waitUntil(timeout: 5) { healthy(dying.address) == false }, proxy.log)
        print("UDP send_expect: stopped endpoint unhealthy after \(Int(Date().timeIntervalSince(stopped) * 1000)) ms")
        XCTAssertTrue(proxy.log.contains("connection refused"), "the reason names the ICMP error: \(String(proxy.log.suffix(2000)))")
        XCTAssertEqual(healthy(alive.address), true)

        // Every new session lands on the one healthy endpoint.
        for i in 0..<20 {
            let fd = try UDPClient.connect(host: "127.0.0.1", port: port)
            defer { close(fd) }
            XCTAssertEqual(exchange(fd, [UInt8(i)]), [UInt8(i)], "session \(i)")
        }
    }

    /// `type: dns` against Debian's nsd, over UDP (inferred from the listener) and TCP:
    /// a name in the zone passes with NOERROR; a missing one fails (NXDOMAIN) unless
    /// NXDOMAIN is what is expected.
    func testDNSHealthCheckAgainstNSD() throws {
        let nsd = try NSDServer()
        let endpoint = "127.0.0.1:\(nsd.port)"
        func cluster(_ name: String, _ check: String) -> String {
            """
              - name: \(name)
                endpoints: [{ address: "\(endpoint)" }]
                health_check: { type: dns, interval: 100ms, timeout: 500ms, \(check) }
            """
        }
        let ports = (0..<4).map { _ in Sockets.freePort() }
        let names = ["found", "missing", "expected-missing", "over-tcp"]
        let config = """
            workers: 1
            listeners:
            \(names.enumerated().map { "  - { name: \($0.element), address: 127.0.0.1:\(ports[$0.offset]), protocol: udp, cluster: \($0.element) }" }.joined(separator: "\n"))
            clusters:
            \(cluster("found", "query: host1.example.test, query_type: A"))
            \(cluster("missing", "query: nothing.example.test"))
            \(cluster("expected-missing", "query: nothing.example.test, expected_rcode: [NXDOMAIN]"))
            \(cluster("over-tcp", "query: host2.example.test, protocol: tcp"))
            """
        let proxy = try L4LBProcess(config: config, waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        func healthy(_ cluster: String) -> Bool? { (try? proxy.stats())?.endpoint(cluster: cluster, address: endpoint)?.bool("healthy") }
        XCTAssertTrue(waitUntil(timeout: 5) { healthy("found") == true && healthy("expected-missing") == true && healthy("over-tcp") == true },
                      "\(names.map { "\($0): \(String(describing: healthy($0)))" }) \(String(proxy.log.suffix(3000)))")
        XCTAssertEqual(healthy("missing"), false)
        XCTAssertTrue(proxy.log.contains("DNS NXDOMAIN"), String(proxy.log.suffix(2000)))
        // And the checked cluster serves: a query through l4lb.
        let fd = try UDPClient.connect(host: "127.0.0.1", port: ports[0])
        defer { close(fd) }
        let reply = try XCTUnwrap(exchange(fd, DNS.query(id: 77, name: "host5.example.test")).flatMap(DNS.answer))
        XCTAssertEqual(reply.address, "192.0.2.6")
    }

    /// A listener bound to 0.0.0.0: each reply leaves from the address the client sent to
    /// (IP_PKTINFO), so connected clients of 127.0.0.2 and 127.0.0.3 (whose kernel drops
    /// datagrams from any other source) get their answers, per client and per packet.
    func testWildcardListenerRepliesFromTheAddressTheClientUsed() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        for mode in ["client", "none"] {
            let port = Sockets.freePort(host: "0.0.0.0")
            let proxy = try L4LBProcess(config: """
                workers: 2
                listeners:
                  - { name: any, address: 0.0.0.0:\(port), protocol: udp, cluster: udp, session: \(mode) }
                clusters:
                  - { name: udp, endpoints: [{ address: "\(backend.address)" }] }
                """, waitFor: nil)
            defer { proxy.stop() }
            XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
            for host in ["127.0.0.2", "127.0.0.3", "127.0.0.1"] {
                let fd = try UDPClient.connect(host: host, port: port)
                defer { close(fd) }
                for i in 0..<5 {
                    let payload = Array("\(mode) \(host) \(i)".utf8)
                    XCTAssertEqual(exchange(fd, payload), payload, "session: \(mode), client of \(host)")
                }
            }
        }
    }

    /// Reloads with UDP: an open session keeps its endpoint after the cluster's endpoints
    /// change (as an established TCP connection does) while new clients get the new one; a
    /// mode change applies to new datagrams; an added UDP listener serves at once, and a
    /// removed one closes its port and ends its sessions.
    func testReloadsChangeUDPListenersWithoutDisturbingOpenSessions() throws {
        let first = try UDPBackend(.identify("first"))
        let second = try UDPBackend(.identify("second"))
        defer { first.stop(); second.stop() }
        let port = Sockets.freePort(), extraPort = Sockets.freePort()
        func yaml(_ endpoint: String, session: String, extra: Bool) -> String {
            """
            workers: 2
            listeners:
              - { name: dns, address: 127.0.0.1:\(port), protocol: udp, cluster: udp, session: \(session) }
            \(extra ? "  - { name: extra, address: 127.0.0.1:\(extraPort), protocol: udp, cluster: udp }" : "")
            clusters:
              - { name: udp, endpoints: [{ address: "\(endpoint)" }] }
            """
        }
        let proxy = try L4LBProcess(config: yaml(first.address, session: "client", extra: false), waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        func name(_ fd: Int32) -> String? { exchange(fd, [1]).map { String(decoding: $0, as: UTF8.self) } }
        let open = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(open) }
        XCTAssertEqual(name(open), "first")

        try proxy.writeConfig(yaml(second.address, session: "client", extra: true))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        XCTAssertEqual(name(open), "first", "the open session keeps its endpoint")
        let fresh = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(fresh) }
        XCTAssertEqual(name(fresh), "second", "a new client gets the new endpoint")
        let extra = try UDPClient.connect(host: "127.0.0.1", port: extraPort)
        defer { close(extra) }
        XCTAssertEqual(name(extra), "second", "the added listener serves at once")

        // Per packet from now on: the open client's next datagram is balanced anew.
        try proxy.writeConfig(yaml(second.address, session: "none", extra: false))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        XCTAssertEqual(name(fresh), "second")
        XCTAssertTrue(waitUntil(timeout: 5) { (try? proxy.stats())?.listener("extra") == nil }, "the removed listener is gone from /stats")
        // The removed listener's port is closed: ICMP port unreachable, the send fails.
        Sockets.setTimeout(extra, seconds: 0.5)
        XCTAssertNil(exchange(extra, [2]), "a removed listener does not answer")
        XCTAssertEqual(try proxy.admin("GET", "/config").json["listeners"].map { ($0 as? [[String: Any]])?.count }, 1)
    }

    /// The access log has a line per UDP session as it ends (client, endpoint, bytes each
    /// way, why), and per exchange in per-packet mode.
    func testUDPSessionsEndInTheAccessLog() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-udp-log-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let logPath = directory.appendingPathComponent("access.log").path
        let port = Sockets.freePort(), idlePort = Sockets.freePort(), perPacketPort = Sockets.freePort()
        let proxy = try L4LBProcess(config: """
            workers: 1
            access_log: { path: \(logPath), format: json }
            listeners:
              - { name: dns, address: 127.0.0.1:\(port), protocol: udp, cluster: udp, proxy_responses: 1 }
              - { name: idle, address: 127.0.0.1:\(idlePort), protocol: udp, cluster: udp, idle_timeout: 1s }
              - { name: packets, address: 127.0.0.1:\(perPacketPort), protocol: udp, cluster: udp, session: none }
            clusters:
              - { name: udp, endpoints: [{ address: "\(backend.address)" }] }
            """, waitFor: nil)
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
        let fd = try UDPClient.connect(host: "127.0.0.1", port: port)
        defer { close(fd) }
        // Two datagrams before either reply: one session, ended by its second reply.
        let first = [UInt8](repeating: 1, count: 100), second = [UInt8](repeating: 2, count: 50)
        XCTAssertEqual(send(fd, first, first.count, 0), first.count)
        XCTAssertEqual(send(fd, second, second.count, 0), second.count)
        var buffer = [UInt8](repeating: 0, count: 256)
        XCTAssertEqual(recv(fd, &buffer, buffer.count, 0) + recv(fd, &buffer, buffer.count, 0), 150)
        let idle = try UDPClient.connect(host: "127.0.0.1", port: idlePort)
        defer { close(idle) }
        XCTAssertEqual(exchange(idle, [UInt8](repeating: 3, count: 7)), [UInt8](repeating: 3, count: 7))
        let other = try UDPClient.connect(host: "127.0.0.1", port: perPacketPort)
        defer { close(other) }
        for _ in 0..<3 { XCTAssertEqual(exchange(other, [9, 9, 9]), [9, 9, 9]) }
        // The idle listener's session ends after 1 s.
        XCTAssertTrue(waitUntil(timeout: 10) { ObservabilityTests.accessLines(logPath).count == 5 }, "\(ObservabilityTests.accessLines(logPath))")
        let lines = ObservabilityTests.accessLines(logPath)
        let session = try XCTUnwrap(lines.first { $0["listener"] as? String == "dns" })
        XCTAssertEqual(session["end"] as? String, "responses")
        XCTAssertEqual(session["bytes_in"] as? Int, 150)
        XCTAssertEqual(session["bytes_out"] as? Int, 150)
        XCTAssertEqual(session["client"] as? String, "127.0.0.1:\(Sockets.localPort(fd))")
        XCTAssertEqual(session["endpoint"] as? String, backend.address)
        let expired = try XCTUnwrap(lines.first { $0["listener"] as? String == "idle" })
        XCTAssertEqual(expired["end"] as? String, "idle_timeout")
        XCTAssertEqual(expired["bytes_in"] as? Int, 7)
        let exchanges = lines.filter { $0["listener"] as? String == "packets" }
        XCTAssertEqual(exchanges.count, 3, "one line per per-packet exchange")
        XCTAssertTrue(exchanges.allSatisfy { $0["end"] as? String == "responses" && $0["bytes_in"] as? Int == 3 && $0["bytes_out"] as? Int == 3 })
    }
}
