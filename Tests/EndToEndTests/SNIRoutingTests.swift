import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// SNI routing without termination (must show 4): real TLS clients and Debian's nginx
/// terminating TLS behind l4lb; hostile ClientHellos closed and counted.
final class SNIRoutingTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    func config(port: UInt16, a: UInt16, b: UInt16, fallback: UInt16) -> String {
        """
        workers: 2
        listeners:
          - name: passthrough
            address: 127.0.0.1:\(port)
            cluster: fallback
            inspect_timeout: 2s
            routes:
              - { server_names: [a.example.test, "*.a.example.test"], cluster: a }
              - { server_names: [B.example.test], cluster: b }
        clusters:
          - { name: a, endpoints: [{ address: 127.0.0.1:\(a) }] }
          - { name: b, endpoints: [{ address: 127.0.0.1:\(b) }] }
          - { name: fallback, endpoints: [{ address: 127.0.0.1:\(fallback) }] }
        """
    }

    func sni(_ proxy: L4LBProcess, _ counter: String) -> Int {
        let listeners = (try? proxy.stats())?["listeners"] as? [[String: Any]] ?? []
        return (listeners.first?["sni"] as? [String: Any])?[counter] as? Int ?? -1
    }

    func testClientHellosReachTheirClustersAndHostileOnesAreClosed() throws {
        let pki = try TestPKI()
        let a = try NginxServer(http: "location / { return 200 \"from a\\n\"; }", tls: (pki.path("a.pem"), pki.path("a.key")))
        let b = try NginxServer(http: "location / { return 200 \"from b\\n\"; }", tls: (pki.path("b.pem"), pki.path("b.key")))
        let fallback = try NginxServer(http: "location / { return 200 \"from fallback\\n\"; }", tls: (pki.path("a.pem"), pki.path("a.key")))
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(port: port, a: a.port, b: b.port, fallback: fallback.port), waitFor: ("127.0.0.1", port))

        func curl(_ name: String) throws -> String {
            let (status, body) = try ChildProcess.run("/usr/bin/curl", [
                "-sS", "--cacert", pki.path("ca.pem"), "--resolve", "\(name):\(port):127.0.0.1", "https://\(name):\(port)/",
            ])
            XCTAssertEqual(status, 0, body)
            return body
        }
        // TLS intact end to end: curl verifies the certificate nginx presents.
        XCTAssertEqual(try curl("a.example.test"), "from a\n")
        XCTAssertEqual(try curl("www.a.example.test"), "from a\n", "wildcard route")
        XCTAssertEqual(try curl("b.example.test"), "from b\n", "names match case-insensitively")
        let noSNI = try ChildProcess.run("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)", "-noservername"]).output
        XCTAssertTrue(noSNI.contains("subject=CN = a.example.test"), "no SNI: the default cluster's nginx: \(noSNI)")

        // A ClientHello in 1-byte segments.
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Support/tls_split_client.py").path
        let split = try ChildProcess.run("/usr/bin/python3", [script, "--port", "\(port)", "--cafile", pki.path("ca.pem"), "--servername", "b.example.test"])
        XCTAssertEqual(split.output, "from b\n")
        XCTAssertEqual(split.status, 0)
        XCTAssertEqual(sni(proxy, "routed"), 4)
        XCTAssertEqual(sni(proxy, "default"), 1)

        // Garbage: closed at once, counted.
        let garbage = try Sockets.connect(port: port)
        try Sockets.sendAll(garbage, Array("GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n".utf8))
        XCTAssertNotNil(Sockets.waitForClose(garbage, timeout: 2), "garbage not closed")
        close(garbage)
        // A 20 KiB ClientHello: refused from its header.
        let big = try Sockets.connect(port: port)
        var hello: [UInt8] = [0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x4E, 0x20]
        hello += [UInt8](repeating: 0, count: 16_384 - 4)
        hello += [0x16, 3, 1, 0x0E, 0x24] + [UInt8](repeating: 0, count: 0x0E24)
        try? Sockets.sendAll(big, hello)
        XCTAssertNotNil(Sockets.waitForClose(big, timeout: 2), "oversize ClientHello not closed")
        close(big)
        // 200 clients sending half a ClientHello, then silence: a real client still gets
        // through meanwhile, and all 200 are closed after inspect_timeout.
        let start = Date()
        let stalled = try (0..<200).map { _ in try Sockets.connect(port: port) }
        defer { stalled.forEach { close($0) } }
        for fd in stalled { try Sockets.sendAll(fd, [0x16, 3, 1, 0x01, 0x00, 1, 0, 0]) }
        XCTAssertEqual(try curl("a.example.test"), "from a\n")
        for fd in stalled { XCTAssertNotNil(Sockets.waitForClose(fd, timeout: 5), "a stalled ClientHello not closed") }
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 1.5, "closed before inspect_timeout")
        XCTAssertTrue(waitUntil(timeout: 3) {
            self.sni(proxy, "malformed") == 1 && self.sni(proxy, "oversize") == 1 && self.sni(proxy, "timeouts") == 200
        }, "\((try? proxy.stats())?["listeners"] ?? [])")
        XCTAssertEqual(sni(proxy, "routed"), 5)
        // Per route: a.example.test and its wildcard 3 (curl twice, www once), B.example.test 2.
        let listeners = try proxy.stats()["listeners"] as? [[String: Any]] ?? []
        let routes = (listeners.first?["sni"] as? [String: Any])?["routes"] as? [[String: Any]] ?? []
        XCTAssertEqual(routes.map { $0["hits"] as? Int ?? -1 }, [3, 2], "\(routes)")
        XCTAssertEqual(routes.map { $0["cluster"] as? String ?? "" }, ["a", "b"])
        let metrics = String(decoding: try proxy.admin("GET", "/metrics").body, as: UTF8.self)
        XCTAssertTrue(metrics.contains("l4lb_sni_route_hits_total{listener=\"passthrough\",route=\"a.example.test\",cluster=\"a\"} 3"), metrics)
        proxy.stop()
    }
}
