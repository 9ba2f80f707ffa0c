import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Endpoints from DNS (issue 36), against Debian's unbound changed live with
/// `unbound-control`: traffic follows the records within their TTL, removed endpoints'
/// open connections finish, nothing fails, and the same records in another order make
/// no new snapshot.
final class DNSDiscoveryTests: XCTestCase {
    static func config(listen: UInt16, unbound: UnboundServer, dns: String, healthCheck: Bool = false) -> String {
        """
        workers: 1
        listeners:
          - { name: web, address: 127.0.0.1:\(listen), cluster: web }
        clusters:
          - name: web
            balancer: round_robin
            dns: { \(dns), resolvers: [\(unbound.address)] }
        """ + (healthCheck ? "\n    health_check: { type: tcp, interval: 200ms, timeout: 200ms, unhealthy_threshold: 2, healthy_threshold: 1 }\n" : "")
    }

    /// Must-show 1 (A records): two addresses, TTL 2 s, while 50 clients connect in a loop;
    /// one is replaced. The new address takes connections within TTL + 1 s, the removed one
    /// takes none after that, the connection held open to it keeps echoing, and no client
    /// connection fails. Then, the answers rotating (`rrset-roundrobin`) for several TTLs,
    /// the generation stays where it is.
    func testTrafficFollowsARecordsWithinTheirTTLWithNoFailedConnection() throws {
        let port = Sockets.freePort()
        let backends = try ["127.0.0.11", "127.0.0.12", "127.0.0.13"].map { try TestBackend(.echo, host: $0, port: port) }
        defer { backends.forEach { $0.stop() } }
        let unbound = try UnboundServer(records: ["web.svc.test. 2 IN A 127.0.0.11", "web.svc.test. 2 IN A 127.0.0.12"])
        defer { unbound.stop() }
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, unbound: unbound, dns: "name: web.svc.test, type: A, port: \(port), min_ttl: 1s"),
                                    waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        func addresses() -> Set<String> {
            let clusters = (try? proxy.stats())?["clusters"] as? [[String: Any]] ?? []
            // Not the removed ones still listed for their open connections.
            return Set((clusters.first?["endpoints"] as? [[String: Any]] ?? []).filter { $0.bool("removed") != true }.compactMap { $0["address"] as? String })
        }
        XCTAssertEqual(addresses(), ["127.0.0.11:\(port)", "127.0.0.12:\(port)"], "l4lb did not start with the answer's endpoints")

        // Connections held open across the change, one on each (round robin).
        let held = try (0..<2).map { i -> Int32 in
            let fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i))
            return fd
        }
        defer { held.forEach { close($0) } }
        XCTAssertEqual(backends[0].dataConnections, 1)

        let clients = (0..<50).map { _ in ConnectionChurn(port: listen, bytes: 64) }
        XCTAssertTrue(waitUntil(timeout: 5) { clients.allSatisfy { $0.succeeded > 0 } })
        let changed = Date()
        try unbound.replace("web.svc.test", with: ["web.svc.test. 2 IN A 127.0.0.12", "web.svc.test. 2 IN A 127.0.0.13"])
        XCTAssertTrue(waitUntil(timeout: 10) { backends[2].dataConnections > 0 }, "the new address got no connection")
        let followed = Date().timeIntervalSince(changed)
        XCTAssertLessThanOrEqual(followed, 3.0 + 0.5, "traffic followed after \(followed) s, not within TTL 2 s + 1 s")
        XCTAssertEqual(addresses(), ["127.0.0.12:\(port)", "127.0.0.13:\(port)"])
        let removedCount = backends[0].dataConnections
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(backends[0].dataConnections, removedCount, "the removed address took new connections")
        let outcomes = clients.map { $0.finish() }
        XCTAssertEqual(outcomes.flatMap(\.failures), [], "client connections failed")
        XCTAssertGreaterThan(outcomes.map(\.succeeded).reduce(0, +), 500)
        for (i, fd) in held.enumerated() { XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 10 + i), "held connection \(i) was disturbed") }

        // Rotating answers, same set: no new snapshot over several TTLs.
        let generation = try proxy.stats().int("generation")
        let updates = (try proxy.stats()["clusters"] as? [[String: Any]])?.first?["dns"].flatMap { $0 as? [String: Any] }?.int("updates")
        Thread.sleep(forTimeInterval: 5)
        XCTAssertEqual(try proxy.stats().int("generation"), generation, "the same records in another order made a new snapshot")
        XCTAssertEqual((try proxy.stats()["clusters"] as? [[String: Any]])?.first?["dns"].flatMap { $0 as? [String: Any] }?.int("updates"), updates)
        let discovery = try proxy.admin("GET", "/discovery").json["dns"] as? [[String: Any]] ?? []
        XCTAssertEqual(discovery.first?["state"] as? String, "ok", "\(discovery)")
        XCTAssertEqual(discovery.first?.int("ttl"), 2)
        let printed = try proxy.runAdminCommand(["discovery"])
        XCTAssertEqual(printed.status, 0, printed.output)
        XCTAssertTrue(printed.output.contains("cluster web: dns web.svc.test A, ok, 2 endpoints, ttl 2 s"), printed.output)
        XCTAssertTrue(printed.output.contains("127.0.0.12:\(port) 127.0.0.13:\(port)"), printed.output)
    }

    /// Past `hold` with no answer the cluster is emptied (state `expired`, new connections
    /// refused: its endpoints may be gone for good); the next good answer brings them back.
    func testPastTheHoldTheEndpointsGoAndTheNextAnswerRestoresThem() throws {
        let port = Sockets.freePort()
        let backend = try TestBackend(.echo, host: "127.0.0.11", port: port)
        defer { backend.stop() }
        let unbound = try UnboundServer(records: ["web.svc.test. 1 IN A 127.0.0.11"])
        defer { unbound.stop() }
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, unbound: unbound,
                                                        dns: "name: web.svc.test, type: A, port: \(port), min_ttl: 1s, timeout: 500ms, hold: 3s"),
                                    waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        func state() -> String? { ((try? proxy.admin("GET", "/discovery"))?.json["dns"] as? [[String: Any]])?.first?["state"] as? String }
        func echoes() -> Bool {
            guard let fd = try? Sockets.connect(port: listen) else { return false }
            defer { close(fd) }
            Sockets.setTimeout(fd, seconds: 2)
            return KernelForwardingOperationsTests.echo(fd, 1)
        }
        XCTAssertTrue(echoes())
        let paused = Date()
        unbound.pause()
        XCTAssertTrue(waitUntil(timeout: 5) { state() == "stale" })
        XCTAssertTrue(echoes(), "the last answer serves within the hold")
        XCTAssertTrue(waitUntil(timeout: 10) { state() == "expired" }, "\(state() ?? "nil")")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(paused), 3, "expired before the hold")
        XCTAssertTrue(waitUntil(timeout: 2) { !echoes() }, "an emptied cluster still served")
        unbound.resume()
        XCTAssertTrue(waitUntil(timeout: 5) { state() == "ok" })
        XCTAssertTrue(waitUntil(timeout: 5) { echoes() }, "the endpoints did not come back with the answer")
    }

    /// Must-show 1 (SRV): priority, weight and port honoured — the two targets of the lowest
    /// priority share connections 1:3 on their own ports, the higher priority's takes none
    /// (it is listed with weight 0, health checked and ready); with both of the lowest
    /// priority's endpoints down, the next priority serves.
    func testSRVPriorityWeightAndPortAreHonoured() throws {
        let backends = try (0..<3).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let unbound = try UnboundServer(records: [
            "_web._tcp.svc.test. 30 IN SRV 10 1 \(backends[0].port) a.svc.test.",
            "_web._tcp.svc.test. 30 IN SRV 10 3 \(backends[1].port) b.svc.test.",
            "_web._tcp.svc.test. 30 IN SRV 20 1 \(backends[2].port) c.svc.test.",
            "a.svc.test. 30 IN A 127.0.0.1", "b.svc.test. 30 IN A 127.0.0.1", "c.svc.test. 30 IN A 127.0.0.1",
        ])
        defer { unbound.stop() }
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, unbound: unbound, dns: "name: _web._tcp.svc.test, type: SRV", healthCheck: true),
                                    waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        let endpoints = (try proxy.stats()["clusters"] as? [[String: Any]])?.first?["endpoints"] as? [[String: Any]] ?? []
        let weights = Dictionary(endpoints.compactMap { e in (e["address"] as? String).map { ($0, e.int("weight")) } }) { a, _ in a }
        XCTAssertEqual(weights, ["127.0.0.1:\(backends[0].port)": 1, "127.0.0.1:\(backends[1].port)": 3, "127.0.0.1:\(backends[2].port)": 0])
        for i in 0..<400 {
            let fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i))
            close(fd)
        }
        XCTAssertEqual(backends.map(\.dataConnections), [100, 300, 0], "round robin by the SRV weights, the backup priority unused")

        backends[0].stop()
        backends[1].stop()
        XCTAssertTrue(waitUntil(timeout: 5) {
            let endpoints = (try? proxy.stats())?["clusters"].flatMap { $0 as? [[String: Any]] }?.first?["endpoints"] as? [[String: Any]] ?? []
            return endpoints.first { $0["address"] as? String == "127.0.0.1:\(backends[2].port)" }?.int("weight") == 1
        }, "the next priority did not take over")
        for i in 0..<20 {
            let fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i), "connection \(i) after the failover")
            close(fd)
        }
        XCTAssertEqual(backends[2].dataConnections, 20)
    }

    /// Must-show 1 (size): 60 A records do not fit the 512 bytes this unbound answers over
    /// UDP; the truncated answer is asked again over TCP and all 60 become endpoints.
    func testASixtyRecordAnswerComesOverTCPAndAllAreUsed() throws {
        let backend = try TestBackend(.echo, host: "0.0.0.0")
        defer { backend.stop() }
        let unbound = try UnboundServer(records: (1...60).map { "many.svc.test. 30 IN A 127.0.1.\($0)" }, extra: ["max-udp-size: 512"])
        defer { unbound.stop() }
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, unbound: unbound, dns: "name: many.svc.test, type: A, port: \(backend.port)"),
                                    waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        let discovery = try proxy.admin("GET", "/discovery").json["dns"] as? [[String: Any]] ?? []
        XCTAssertEqual(discovery.first?["over_tcp"] as? Bool, true, "\(discovery)")
        XCTAssertEqual((discovery.first?["endpoints"] as? [[String: Any]])?.count, 60)
        for i in 0..<120 {
            let fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i))
            close(fd)
        }
        // (An endpoint's total counts a connection as it ends; the harness's start-up probe
        // makes one more.)
        var endpoints: [[String: Any]] = []
        XCTAssertTrue(waitUntil(timeout: 5) {
            endpoints = (try? proxy.stats())?["clusters"].flatMap { $0 as? [[String: Any]] }?.first?["endpoints"] as? [[String: Any]] ?? []
            return endpoints.count == 60 && endpoints.allSatisfy { $0.int("total") >= 2 }
        }, "every one of the 60 did not take its two connections: \(endpoints.map { $0.int("total") })")
    }

    /// Must-show 2: the resolver stops answering (SIGSTOP), then answers SERVFAIL (its zone
    /// forwarded to a port where nothing listens), then NXDOMAIN — throughout, the last
    /// answer keeps serving (hold 60 s), `/stats` and `/discovery` say `stale` with the
    /// error, and every connection succeeds; the next good answer makes it `ok` again, with
    /// its new endpoint in use.
    func testTheLastAnswerServesThroughTimeoutsServfailAndNXDOMAIN() throws {
        let port = Sockets.freePort()
        let backends = try ["127.0.0.11", "127.0.0.12"].map { try TestBackend(.echo, host: $0, port: port) }
        defer { backends.forEach { $0.stop() } }
        let nowhere = Sockets.freePort()
        let unbound = try UnboundServer(records: ["web.flip.test. 1 IN A 127.0.0.11"], extra: [
            "local-zone: \"flip.test.\" static", "do-not-query-localhost: no",
        ], tail: ["forward-zone:", "  name: \"flip.test.\"", "  forward-addr: 127.0.0.1@\(nowhere)"])
        defer { unbound.stop() }
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, unbound: unbound,
                                                        dns: "name: web.flip.test, type: A, port: \(port), min_ttl: 1s, timeout: 2s, hold: 60s"),
                                    waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        func source() -> [String: Any] { ((try? proxy.admin("GET", "/discovery"))?.json["dns"] as? [[String: Any]])?.first ?? [:] }
        func statsDNS() -> [String: Any] { (try? proxy.stats())?["clusters"].flatMap { $0 as? [[String: Any]] }?.first?["dns"] as? [String: Any] ?? [:] }
        func connects(_ n: Int) -> Int {
            (0..<n).filter { i in
                guard let fd = try? Sockets.connect(port: listen) else { return false }
                defer { close(fd) }
                Sockets.setTimeout(fd, seconds: 5)
                return KernelForwardingOperationsTests.echo(fd, i)
            }.count
        }
        XCTAssertEqual(source()["state"] as? String, "ok", "\(source())")
        let generation = try proxy.stats().int("generation")

        // Silent.
        unbound.pause()
        XCTAssertTrue(waitUntil(timeout: 10) { source()["state"] as? String == "stale" }, "\(source())")
        XCTAssertEqual(source()["last_error"] as? String, "no answer within the timeout")
        XCTAssertEqual(statsDNS()["state"] as? String, "stale")
        XCTAssertEqual(connects(20), 20, "connections failed while the resolver was silent")
        unbound.resume()

        // SERVFAIL: the zone is no longer answered locally and its forwarder is not there.
        try unbound.control(["local_data_remove", "web.flip.test"])
        try unbound.control(["local_zone", "flip.test", "transparent"])
        XCTAssertTrue(waitUntil(timeout: 20) { (source()["last_error"] as? String) == "SERVFAIL" }, "\(source())")
        XCTAssertEqual(source()["state"] as? String, "stale")
        XCTAssertEqual(connects(20), 20, "connections failed on SERVFAIL")

        // NXDOMAIN: the zone answered locally again, without the name.
        try unbound.control(["local_zone", "flip.test", "static"])
        XCTAssertTrue(waitUntil(timeout: 10) { (source()["last_error"] as? String) == "NXDOMAIN" }, "\(source())")
        XCTAssertEqual(source()["state"] as? String, "stale")
        XCTAssertEqual(connects(20), 20, "connections failed on NXDOMAIN")
        // The metrics say so too.
        let metrics = try proxy.admin("GET", "/metrics").text.split(separator: "\n")
        func metric(_ name: String) -> Double? {
            metrics.first { $0.hasPrefix("\(name){cluster=\"web\",source=\"dns\"}") }.flatMap { Double($0.split(separator: " ").last ?? "") }
        }
        XCTAssertGreaterThan(metric("l4lb_discovery_failures_total") ?? 0, 2)
        XCTAssertGreaterThan(metric("l4lb_discovery_stale_seconds") ?? 0, 1)
        XCTAssertEqual(metric("l4lb_discovery_endpoints"), 1)
        XCTAssertEqual(try proxy.stats().int("generation"), generation, "a failure made a new snapshot")
        XCTAssertEqual(backends[1].dataConnections, 0)

        // A good answer again, with another address: ok, and it serves.
        try unbound.control(["local_data", "web.flip.test. 1 IN A 127.0.0.12"])
        XCTAssertTrue(waitUntil(timeout: 10) { source()["state"] as? String == "ok" }, "\(source())")
        XCTAssertTrue(waitUntil(timeout: 5) { connects(1) == 1 && backends[1].dataConnections > 0 }, "the new answer's endpoint took no connection")
        XCTAssertGreaterThan(source().int("failures"), 2)
    }
}
