import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Clusters from an xDS control plane (issue 36), against a management server written on
/// grpcio with the `xds-protos` package: what any Envoy control plane speaks.
final class XDSDiscoveryTests: XCTestCase {
    static func config(listen: UInt16, split: UInt16, xds: XDSServer, extra: String = "", clusters: String = "") -> String {
        """
        workers: 1
        xds:
          server: \(xds.address)
          node_id: l4lb-test-1
          node_cluster: edge
          backoff: 100ms
          max_backoff: 1s
        \(extra)
        listeners:
          - { name: web, address: 127.0.0.1:\(listen), cluster: web }
          - name: both
            address: 127.0.0.1:\(split)
            clusters: [{ name: web, weight: 1 }, { name: aux, weight: 1 }]
        \(clusters)
        """
    }

    /// New connections per backend while `body` runs for `seconds`.
    static func share(_ backends: [TestBackend], seconds: TimeInterval) -> [Int] {
        let before = backends.map(\.dataConnections)
        Thread.sleep(forTimeInterval: seconds)
        return zip(backends, before).map { $0.dataConnections - $1 }
    }

    /// Must-show 3: no endpoint in the file; CDS and EDS bring the clusters up and traffic
    /// flows. ACKs echo the exact version and nonce of each response, and come after the
    /// snapshot. Then, under 50 churning clients: a weight change, an endpoint marked
    /// UNHEALTHY, one marked DRAINING (its open connection finishes), and a removed cluster
    /// all take effect, and no client connection fails.
    func testClustersFromCDSAndEDSFollowEveryUpdateUnderLoadWithNoFailedConnection() throws {
        let port = Sockets.freePort()
        let backends = try ["127.0.0.21", "127.0.0.22", "127.0.0.23"].map { try TestBackend(.echo, host: $0, port: port) }
        defer { backends.forEach { $0.stop() } }
        let xds = try XDSServer()
        defer { xds.stop() }
        try xds.set(version: "v1", clusters: [XDSServer.cluster("web"), XDSServer.cluster("aux")], assignments: [
            XDSServer.assignment("web", [("127.0.0.21", port, 1, "HEALTHY"), ("127.0.0.22", port, 1, "HEALTHY")]),
            XDSServer.assignment("aux", [("127.0.0.23", port, 1, "HEALTHY")]),
        ])
        let listen = Sockets.freePort()
        let split = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, split: split, xds: xds), waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { xds.acked(XDSServer.eds, version: "v1") }, "no EDS ACK: \(xds.entries())")
        let clusters = try proxy.stats()["clusters"] as? [[String: Any]] ?? []
        XCTAssertEqual(Set(clusters.map { $0["name"] as? String ?? "" }), ["web", "aux"])
        let fd = try Sockets.connect(port: listen)
        Sockets.setTimeout(fd, seconds: 5)
        XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 1), "traffic does not flow through a cluster from xDS")
        close(fd)

        // The first request carries the node; every response is ACKed once, with its own
        // version and nonce.
        let first = xds.requests().first
        XCTAssertEqual(first?["node_id"] as? String, "l4lb-test-1")
        XCTAssertEqual(first?["node_cluster"] as? String, "edge")
        XCTAssertEqual(first?["user_agent_name"] as? String, "l4lb")
        func checkACKs() {
            let entries = xds.entries()
            for response in entries where response["kind"] as? String == "response" {
                let nonce = response["nonce"] as? String
                // The ACK; a later request may carry the same nonce when it changes the
                // subscription (EDS names after a CDS update), never a second answer.
                let answers = entries.filter { $0["kind"] as? String == "request" && $0["response_nonce"] as? String == nonce }
                XCTAssertGreaterThanOrEqual(answers.count, 1, "response \(response) not answered")
                for answer in answers {
                    XCTAssertEqual(answer["version_info"] as? String, response["version_info"] as? String, "ACK of \(response): \(answers)")
                    XCTAssertTrue(answer["error_detail"] is NSNull, "\(answers)")
                }
                let names = answers.map { ($0["resource_names"] as? [String] ?? []).sorted() }
                XCTAssertEqual(Set(names.map { $0.joined(separator: ",") }).count, names.count, "the same request sent twice: \(answers)")
            }
        }
        checkACKs()

        // A connection held open to each web endpoint, across the updates.
        var held: [Int32] = []
        while held.count < 2 {
            let fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 2))
            held.append(fd)
        }
        defer { held.forEach { close($0) } }
        XCTAssertEqual(backends[0].dataConnections, 2)
        XCTAssertEqual(backends[1].dataConnections, 1)

        let clients = (0..<40).map { _ in ConnectionChurn(port: listen, bytes: 64) } + (0..<10).map { _ in ConnectionChurn(port: split, bytes: 64) }
        XCTAssertTrue(waitUntil(timeout: 5) { clients.allSatisfy { $0.succeeded > 0 } })

        // Weights 1:3.
        try xds.set(version: "v2", clusters: [XDSServer.cluster("web"), XDSServer.cluster("aux")], assignments: [
            XDSServer.assignment("web", [("127.0.0.21", port, 1, "HEALTHY"), ("127.0.0.22", port, 3, "HEALTHY")]),
            XDSServer.assignment("aux", [("127.0.0.23", port, 1, "HEALTHY")]),
        ])
        XCTAssertTrue(waitUntil(timeout: 5) { xds.acked(XDSServer.eds, version: "v2") })
        let weighted = Self.share(backends, seconds: 1.5)
        let ratio = Double(weighted[1]) / Double(max(weighted[0], 1))
        XCTAssertGreaterThan(ratio, 2.4, "weights 1:3 gave \(weighted)")
        XCTAssertLessThan(ratio, 3.6, "weights 1:3 gave \(weighted)")

        // .21 UNHEALTHY: no new connection reaches it.
        try xds.set(version: "v3", clusters: [XDSServer.cluster("web"), XDSServer.cluster("aux")], assignments: [
            XDSServer.assignment("web", [("127.0.0.21", port, 1, "UNHEALTHY"), ("127.0.0.22", port, 3, "HEALTHY")]),
            XDSServer.assignment("aux", [("127.0.0.23", port, 1, "HEALTHY")]),
        ])
        XCTAssertTrue(waitUntil(timeout: 5) { xds.acked(XDSServer.eds, version: "v3") })
        var shares = Self.share(backends, seconds: 1)
        XCTAssertEqual(shares[0], 0, "an endpoint marked UNHEALTHY took new connections: \(shares)")
        XCTAssertGreaterThan(shares[1], 50)
        let web = (try proxy.stats()["clusters"] as? [[String: Any]])?.first { $0["name"] as? String == "web" }
        let marked = (web?["endpoints"] as? [[String: Any]])?.first { $0["address"] as? String == "127.0.0.21:\(port)" }
        XCTAssertEqual(marked?["control_plane"] as? String, "unhealthy", "\(String(describing: web))")

        // .21 back, .22 DRAINING: .22 takes nothing new, its open connection carries on.
        try xds.set(version: "v4", clusters: [XDSServer.cluster("web"), XDSServer.cluster("aux")], assignments: [
            XDSServer.assignment("web", [("127.0.0.21", port, 1, "HEALTHY"), ("127.0.0.22", port, 3, "DRAINING")]),
            XDSServer.assignment("aux", [("127.0.0.23", port, 1, "HEALTHY")]),
        ])
        XCTAssertTrue(waitUntil(timeout: 5) { xds.acked(XDSServer.eds, version: "v4") })
        shares = Self.share(backends, seconds: 1)
        XCTAssertEqual(shares[1], 0, "an endpoint marked DRAINING took new connections: \(shares)")
        XCTAssertGreaterThan(shares[0], 50)
        XCTAssertTrue(KernelForwardingOperationsTests.echo(held[1], 3), "the draining endpoint's open connection was cut")

        // Cluster aux removed: the split listener sends everything to web.
        try xds.set(version: "v5", clusters: [XDSServer.cluster("web")], assignments: [
            XDSServer.assignment("web", [("127.0.0.21", port, 1, "HEALTHY"), ("127.0.0.22", port, 1, "HEALTHY")]),
        ])
        XCTAssertTrue(waitUntil(timeout: 5) { xds.acked(XDSServer.cds, version: "v5") && xds.acked(XDSServer.eds, version: "v5") })
        shares = Self.share(backends, seconds: 1)
        XCTAssertEqual(shares[2], 0, "the removed cluster's endpoint took new connections: \(shares)")
        let names = (try proxy.stats()["clusters"] as? [[String: Any]] ?? []).filter { $0["removed"] as? Bool != true }.map { $0["name"] as? String ?? "" }
        XCTAssertEqual(Set(names), ["web"])

        let outcomes = clients.map { $0.finish() }
        XCTAssertEqual(outcomes.flatMap(\.failures), [], "client connections failed during the updates")
        XCTAssertGreaterThan(outcomes.map(\.succeeded).reduce(0, +), 1000)
        for (i, fd) in held.enumerated() { XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 10 + i), "held connection \(i) was disturbed") }
        checkACKs()
    }

    /// Must-show 4: a resource l4lb cannot honour is NACKed once — the reason and the last
    /// good version in it, the old config serving, no ACK/NACK storm; so is a discovered
    /// cluster named like one in the file. The server killed: l4lb keeps serving, retries
    /// with backoff, and when the server is back re-subscribes with its node identity and
    /// the versions it holds, and takes the new state.
    func testNACKKeepsTheOldConfigAndAServerRestartIsReconnectedWithBackoff() throws {
        let port = Sockets.freePort()
        let backends = try ["127.0.0.24", "127.0.0.25", "127.0.0.26"].map { try TestBackend(.echo, host: $0, port: port) }
        defer { backends.forEach { $0.stop() } }
        let xds = try XDSServer()
        defer { xds.stop() }
        let good = [XDSServer.cluster("web", policy: "MAGLEV"), XDSServer.cluster("aux")]
        let goodAssignments = [
            XDSServer.assignment("web", [("127.0.0.24", port, 1, "HEALTHY")]),
            XDSServer.assignment("aux", [("127.0.0.25", port, 1, "HEALTHY")]),
        ]
        try xds.set(version: "v1", clusters: good, assignments: goodAssignments)
        let listen = Sockets.freePort()
        let split = Sockets.freePort()
        let fileClusters = """
            clusters:
              - { name: local, endpoints: [{ address: 127.0.0.26:\(port) }] }
            """
        let proxy = try L4LBProcess(config: Self.config(listen: listen, split: split, xds: xds, clusters: fileClusters), waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { xds.acked(XDSServer.eds, version: "v1") })
        let generation = try proxy.stats().int("generation")

        // An unsupported policy: one NACK, naming it, with the last good version.
        try xds.set(version: "v2", clusters: [XDSServer.cluster("web", policy: "CLUSTER_PROVIDED"), XDSServer.cluster("aux")], assignments: goodAssignments)
        XCTAssertTrue(waitUntil(timeout: 5) { xds.requests(XDSServer.cds).contains { $0["error_detail"] is String } })
        let sent = xds.responses(XDSServer.cds).last
        XCTAssertEqual(sent?["version_info"] as? String, "v2")
        Thread.sleep(forTimeInterval: 1.5)
        let answers = xds.requests(XDSServer.cds).filter { $0["response_nonce"] as? String == sent?["nonce"] as? String }
        XCTAssertEqual(answers.count, 1, "the NACK was sent \(answers.count) times")
        XCTAssertEqual(answers.first?["version_info"] as? String, "v1", "a NACK carries the last good version")
        let reason = answers.first?["error_detail"] as? String ?? ""
        XCTAssertTrue(reason.contains("cluster \"web\"") && reason.contains("lb_policy") && reason.contains("CLUSTER_PROVIDED"), reason)
        XCTAssertEqual(answers.first?["error_code"] as? Int, 3)
        XCTAssertEqual(xds.requests(XDSServer.cds).count, 3, "requests after the NACK (a storm?): \(xds.requests(XDSServer.cds))")
        XCTAssertEqual(try proxy.stats().int("generation"), generation, "a NACKed update changed the running config")
        var fd = try Sockets.connect(port: listen)
        Sockets.setTimeout(fd, seconds: 5)
        XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 1), "the old config stopped serving")
        close(fd)
        let discovery = try proxy.admin("GET", "/discovery").json["xds"] as? [String: Any] ?? [:]
        let cds = discovery["clusters"] as? [String: Any] ?? [:]
        XCTAssertEqual(cds["version"] as? String, "v1", "\(discovery)")
        XCTAssertEqual((cds["last_nack"] as? [String: Any])?["version"] as? String, "v2", "\(discovery)")

        // A discovered cluster named like the file's: refused, not an override.
        try xds.set(version: "v3", clusters: good + [XDSServer.cluster("local")], assignments: goodAssignments)
        XCTAssertTrue(waitUntil(timeout: 5) {
            xds.requests(XDSServer.cds).contains { ($0["error_detail"] as? String ?? "").contains("cluster \"local\" is defined in the config file") }
        }, "\(xds.requests(XDSServer.cds))")
        XCTAssertEqual(try proxy.stats().int("generation"), generation)
        // The operator renames the file's cluster: the refused update is taken on the reload
        // and ACKed then, with no new response needed.
        try proxy.writeConfig(Self.config(listen: listen, split: split, xds: xds, clusters: fileClusters.replacingOccurrences(of: "name: local,", with: "name: local-file,")))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        XCTAssertTrue(waitUntil(timeout: 5) { xds.acked(XDSServer.cds, version: "v3") }, "the refused update was not taken after the reload: \(xds.requests(XDSServer.cds))")
        let names = Set((try proxy.stats()["clusters"] as? [[String: Any]] ?? []).map { $0["name"] as? String ?? "" })
        XCTAssertEqual(names, ["local-file", "web", "aux", "local"])

        // The server killed: l4lb keeps serving and retries with backoff (100 ms doubling
        // to 1 s: a handful of attempts in 3 s, not a loop).
        let streamsBefore = discoveryStreams(proxy)
        xds.kill()
        let killed = Date()
        XCTAssertTrue(waitUntil(timeout: 5) { ((try? proxy.admin("GET", "/discovery").json["xds"]) as? [String: Any])?["connected"] as? Bool == false })
        for i in 0..<20 {
            fd = try Sockets.connect(port: listen)
            Sockets.setTimeout(fd, seconds: 5)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i), "l4lb stopped serving while the control plane was away")
            close(fd)
        }
        Thread.sleep(forTimeInterval: max(0, 3 - Date().timeIntervalSince(killed)))
        let attempts = discoveryStreams(proxy) - streamsBefore
        XCTAssertGreaterThanOrEqual(attempts, 2, "l4lb did not retry")
        XCTAssertLessThanOrEqual(attempts, 9, "\(attempts) attempts in 3 s: no backoff")
        let away = try proxy.admin("GET", "/discovery").json["xds"] as? [String: Any] ?? [:]
        XCTAssertNotNil(away["last_error"] as? String, "\(away)")

        // Back, with a new endpoint: l4lb re-subscribes and takes it.
        try xds.start(state: (version: "v4", clusters: good, assignments: [
            XDSServer.assignment("web", [("127.0.0.24", port, 1, "HEALTHY")]),
            XDSServer.assignment("aux", [("127.0.0.25", port, 1, "HEALTHY"), ("127.0.0.26", port, 1, "HEALTHY")]),
        ]))
        XCTAssertTrue(waitUntil(timeout: 10) { xds.acked(XDSServer.eds, version: "v4") }, "\(xds.entries())")
        let again = xds.requests().first
        XCTAssertEqual(again?["node_id"] as? String, "l4lb-test-1", "the first request after the restart carries no node")
        XCTAssertEqual(again?["type_url"] as? String, XDSServer.cds)
        XCTAssertEqual(again?["version_info"] as? String, "v3", "l4lb did not say which version it holds")
        let eds = xds.requests(XDSServer.eds).first
        XCTAssertEqual(Set(eds?["resource_names"] as? [String] ?? []), ["web", "aux", "local"], "EDS not re-subscribed (with what it held): \(String(describing: eds))")
        let aux = (try proxy.stats()["clusters"] as? [[String: Any]])?.first { $0["name"] as? String == "aux" }
        XCTAssertEqual((aux?["endpoints"] as? [[String: Any]])?.count, 2)
        XCTAssertEqual(((try? proxy.admin("GET", "/discovery").json["xds"]) as? [String: Any])?["connected"] as? Bool, true)
        let output = try proxy.runAdminCommand(["discovery"])
        XCTAssertEqual(output.status, 0, output.output)
        XCTAssertTrue(output.output.contains("xds \(xds.address)") && output.output.contains("connected"), output.output)
    }

    /// EDS priorities with l4lb's own health checks: while priority 0's endpoint fails its
    /// check, priority 1 serves; when it passes again, priority 0 takes back over.
    func testTheNextPriorityServesWhileTheLowestFailsItsHealthCheck() throws {
        let port = Sockets.freePort()
        let primary = try TestBackend(.echo, host: "127.0.0.28", port: port)
        let backup = try TestBackend(.echo, host: "127.0.0.29", port: port)
        defer { backup.stop() }
        let xds = try XDSServer()
        defer { xds.stop() }
        let check: [String: Any] = ["healthChecks": [[
            "timeout": "0.2s", "interval": "0.2s", "unhealthyThreshold": 2, "healthyThreshold": 1, "tcpHealthCheck": [:],
        ]]]
        var assignment = XDSServer.assignment("web", [("127.0.0.28", port, 1, "UNKNOWN")])
        var localities = assignment["endpoints"] as! [[String: Any]]
        localities.append(["priority": 1, "lbEndpoints": [[
            "endpoint": ["address": ["socketAddress": ["address": "127.0.0.29", "portValue": Int(port)]]], "loadBalancingWeight": 1,
        ]]])
        assignment["endpoints"] = localities
        try xds.set(version: "p1", clusters: [XDSServer.cluster("web", extra: check)], assignments: [assignment])
        let listen = Sockets.freePort()
        let proxy = try L4LBProcess(config: Self.config(listen: listen, split: Sockets.freePort(), xds: xds), waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { xds.acked(XDSServer.eds, version: "p1") })
        func connectOnce() -> Bool {
            guard let fd = try? Sockets.connect(port: listen) else { return false }
            defer { close(fd) }
            Sockets.setTimeout(fd, seconds: 5)
            return KernelForwardingOperationsTests.echo(fd, 1)
        }
        XCTAssertTrue(waitUntil(timeout: 5) { connectOnce() && primary.dataConnections > 0 })
        XCTAssertEqual(backup.dataConnections, 0, "priority 1 took traffic while priority 0 was healthy")

        primary.stop()
        XCTAssertTrue(waitUntil(timeout: 5) { connectOnce() && backup.dataConnections > 0 }, "priority 1 did not take over")
        let restarted = try TestBackend(.echo, host: "127.0.0.28", port: port)
        defer { restarted.stop() }
        XCTAssertTrue(waitUntil(timeout: 5) { connectOnce() && restarted.dataConnections > 0 }, "priority 0 did not take back over")
        let before = backup.dataConnections
        for _ in 0..<20 { XCTAssertTrue(connectOnce()) }
        XCTAssertEqual(backup.dataConnections, before, "priority 1 kept taking traffic after priority 0 recovered")
    }

    func discoveryStreams(_ proxy: L4LBProcess) -> Int {
        (((try? proxy.admin("GET", "/discovery").json["xds"]) as? [String: Any])?["streams"] as? Int) ?? 0
    }

    /// TLS to the control plane, verified against the test CA with a client certificate
    /// (mTLS); a client without one is refused by the server and says so in `/discovery`.
    func testMutualTLSToTheControlPlane() throws {
        let pki = try TestPKI()
        let port = Sockets.freePort()
        let backend = try TestBackend(.echo, host: "127.0.0.27", port: port)
        defer { backend.stop() }
        let xds = try XDSServer(tls: (cert: pki.path("a.pem"), key: pki.path("a.key"), clientCA: pki.path("ca.pem")))
        defer { xds.stop() }
        try xds.set(version: "t1", clusters: [XDSServer.cluster("web")], assignments: [XDSServer.assignment("web", [("127.0.0.27", port, 1, "HEALTHY")])])
        let listen = Sockets.freePort()
        let tls = """
              tls: { ca: \(pki.path("ca.pem")), cert: \(pki.path("client.pem")), key: \(pki.path("client.key")), server_name: a.example.test }
            """
        let config = Self.config(listen: listen, split: Sockets.freePort(), xds: xds).replacingOccurrences(of: "  max_backoff: 1s\n", with: "  max_backoff: 1s\n\(tls)\n")
        let proxy = try L4LBProcess(config: config, waitFor: ("127.0.0.1", listen))
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) { xds.acked(XDSServer.eds, version: "t1") }, "no ACK over mTLS: \(xds.entries())")
        let fd = try Sockets.connect(port: listen)
        Sockets.setTimeout(fd, seconds: 5)
        XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, 1))
        close(fd)

        // No client certificate: the server refuses the stream, and l4lb says why.
        let anonymous = config.replacingOccurrences(of: ", cert: \(pki.path("client.pem")), key: \(pki.path("client.key"))", with: "")
            .replacingOccurrences(of: "node_id: l4lb-test-1", with: "node_id: l4lb-anonymous")
        let listen2 = Sockets.freePort()
        let refused = try L4LBProcess(config: anonymous.replacingOccurrences(of: "127.0.0.1:\(listen)", with: "127.0.0.1:\(listen2)"), waitFor: ("127.0.0.1", listen2))
        defer { refused.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) {
            (((try? refused.admin("GET", "/discovery").json["xds"]) as? [String: Any])?["last_error"] as? String) != nil
        })
        let state = try refused.admin("GET", "/discovery").json["xds"] as? [String: Any] ?? [:]
        XCTAssertEqual(state["connected"] as? Bool, false, "\(state)")
        XCTAssertFalse(xds.requests().contains { $0["node_id"] as? String == "l4lb-anonymous" }, "a client without a certificate got through")
    }
}
