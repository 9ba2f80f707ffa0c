import COpenSSL
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// TLS termination end to end: a real l4lb process, real TLS clients (curl, openssl
/// s_client, Python's ssl, OpenSSL in the test), real backends on loopback.
final class TLSTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    func tlsConfig(port: UInt16, endpoints: [String], pki: TestPKI, tls extra: [String] = [], listener: [String] = [], workers: Int = 2) -> String {
        let block = [
            "tls:",
            "  certificates:",
            "    - { cert: \(pki.path("a.pem")), key: \(pki.path("a.key")) }",
            "    - { cert: \(pki.path("b.pem")), key: \(pki.path("b.key")) }",
        ] + extra.map { "  " + $0 }
        return proxyConfig(listen: "127.0.0.1:\(port)", endpoints: endpoints, workers: workers, listenerExtra: block + listener)
    }

    /// `openssl s_client` with stdin at EOF: its report (subject, protocol, verification).
    func sClient(_ port: UInt16, _ arguments: [String]) throws -> String {
        try ChildProcess.run("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)"] + arguments).output
    }

    /// `connections` concurrent TLS connections (Python's ssl, `Support/tls_echo_load.py`)
    /// each sending `bytes` of its own pattern: all must come back byte-exact.
    static func echoLoad(port: UInt16, pki: TestPKI, connections: Int, bytes: Int, serverName: String, timeout: Int,
                  file: StaticString = #filePath, line: UInt = #line) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Support/tls_echo_load.py").path
        let (status, output) = try ChildProcess.run("/usr/bin/python3", [
            script, "--port", "\(port)", "--connections", "\(connections)", "--bytes", "\(bytes)",
            "--cafile", pki.path("ca.pem"), "--servername", serverName, "--timeout", "\(timeout)",
        ])
        XCTAssertEqual(status, 0, output, file: file, line: line)
        let result = (try? JSONSerialization.jsonObject(with: Data(output.utf8))) as? [String: Any] ?? [:]
        XCTAssertEqual(result["completed"] as? Int, connections, output, file: file, line: line)
        XCTAssertEqual(result["mismatched"] as? Int, 0, output, file: file, line: line)
    }

    func listenerTLS(_ proxy: L4LBProcess) throws -> [String: Any] {
        let listeners = try proxy.stats()["listeners"] as? [[String: Any]] ?? []
        return listeners.first?["tls"] as? [String: Any] ?? [:]
    }

    /// Must show 1: curl over HTTPS through l4lb to Debian's nginx serving plain HTTP; each
    /// server name gets its certificate and no SNI the default one; TLS 1.3 and 1.2 work,
    /// TLS 1.1 is refused under min_version 1.2.
    func testHTTPSToAPlainBackendAndCertificatesByServerName() throws {
        let pki = try TestPKI()
        let nginx = try NginxServer(http: "location / { return 200 \"hello from nginx\\n\"; }")
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: tlsConfig(port: port, endpoints: ["127.0.0.1:\(nginx.port)"], pki: pki, tls: ["min_version: \"1.2\"", "alpn: [h2, http/1.1]"]),
            waitFor: ("127.0.0.1", port))

        let (status, body) = try ChildProcess.run("/usr/bin/curl", [
            "-sS", "--http1.1", "--cacert", pki.path("ca.pem"), "--resolve", "a.example.test:\(port):127.0.0.1",
            "https://a.example.test:\(port)/",
        ])
        XCTAssertEqual(status, 0, body)
        XCTAssertEqual(body, "hello from nginx\n")

        let a = try sClient(port, ["-servername", "a.example.test", "-CAfile", pki.path("ca.pem")])
        XCTAssertTrue(a.contains("subject=CN = a.example.test"), a)
        XCTAssertTrue(a.contains("Verify return code: 0 (ok)"), a)
        let wildcard = try sClient(port, ["-servername", "api.a.example.test", "-CAfile", pki.path("ca.pem")])
        XCTAssertTrue(wildcard.contains("subject=CN = a.example.test"), wildcard)
        let b = try sClient(port, ["-servername", "b.example.test", "-CAfile", pki.path("ca.pem")])
        XCTAssertTrue(b.contains("subject=CN = b.example.test"), b)
        XCTAssertTrue(b.contains("Verify return code: 0 (ok)"), b)
        let none = try sClient(port, ["-noservername", "-CAfile", pki.path("ca.pem")])
        XCTAssertTrue(none.contains("subject=CN = a.example.test"), "the default certificate is the first: \(none)")

        let v13 = try sClient(port, ["-tls1_3", "-servername", "b.example.test"])
        XCTAssertTrue(v13.contains("New, TLSv1.3"), v13)
        let v12 = try sClient(port, ["-tls1_2", "-servername", "b.example.test"])
        XCTAssertTrue(v12.contains("New, TLSv1.2"), v12)
        XCTAssertTrue(v12.contains("ECDHE-ECDSA"), "the ECDSA certificate: \(v12)")
        let v11 = try sClient(port, ["-tls1_1", "-servername", "b.example.test"])
        XCTAssertTrue(v11.contains("alert protocol version") || v11.contains("no protocols available"), v11)
        XCTAssertFalse(v11.contains("New, TLSv1.1"), v11)

        let alpn = try TLSClient(port: port, .init(serverName: "a.example.test", caFile: pki.path("ca.pem"), alpn: ["http/1.1"]))
        XCTAssertEqual(alpn.selectedALPN, "http/1.1")

        let tls = try listenerTLS(proxy)
        let byVersion = tls["handshakes_by_version"] as? [String: Int] ?? [:]
        XCTAssertGreaterThanOrEqual(byVersion["1.3"] ?? 0, 5, "\(tls)")
        XCTAssertGreaterThanOrEqual(byVersion["1.2"] ?? 0, 1, "\(tls)")
        XCTAssertGreaterThanOrEqual(tls["handshake_failures"] as? Int ?? 0, 1, "the TLS 1.1 attempt: \(tls)")
        // The latency histogram: cumulative, its +Inf bucket every completed handshake.
        let histogram = tls["handshake_milliseconds_histogram"] as? [[String: Any]] ?? []
        let counts = histogram.map { $0["count"] as? Int ?? -1 }
        XCTAssertEqual(histogram.last?["le"] as? String, "+Inf")
        XCTAssertEqual(counts.last, tls["handshakes"] as? Int, "\(histogram)")
        XCTAssertEqual(counts, counts.sorted(), "cumulative: \(histogram)")
        let metrics = String(decoding: try proxy.admin("GET", "/metrics").body, as: UTF8.self)
        XCTAssertTrue(metrics.contains("# TYPE l4lb_tls_handshake_duration_seconds histogram"), metrics)
        XCTAssertTrue(metrics.contains("l4lb_tls_handshake_duration_seconds_count{listener=\"test\"} \(counts.last ?? -1)"), metrics)
        // promtool's linter accepts the TLS families too (the histogram is written by hand).
        try Data(metrics.utf8).write(to: URL(fileURLWithPath: pki.path("metrics.txt")))
        let lint = try ChildProcess.run("/bin/sh", ["-c", "promtool check metrics < \(pki.path("metrics.txt"))"])
        XCTAssertEqual(lint.output.trimmingCharacters(in: .whitespacesAndNewlines), "", "promtool: \(lint.output)")
        proxy.stop()
    }

    /// Must show 2: mTLS. A client certificate from the configured CA gets through and its
    /// common name reaches the backend in the PROXY v2 SSL TLV; no certificate, or one from
    /// another CA, fails the handshake and is counted by reason.
    func testMutualTLSAdmitsTrustedClientsAndTellsTheBackend() throws {
        let pki = try TestPKI()
        let backend = try TestBackend(.proxyProtocol)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: tlsConfig(
                port: port, endpoints: [backend.address], pki: pki,
                tls: ["client_auth: { ca: \(pki.path("ca.pem")), required: true }", "alpn: [echo/1]"], listener: ["proxy_protocol: v2"]),
            waitFor: ("127.0.0.1", port))
        let options = TLSClient.Options(
            serverName: "a.example.test", caFile: pki.path("ca.pem"), certFile: pki.path("client.pem"), keyFile: pki.path("client.key"),
            alpn: ["echo/1"])
        let trusted = try TLSClient(port: port, options)
        try trusted.send(Array("ping".utf8))
        XCTAssertEqual(try trusted.receive(4), Array("ping".utf8))
        XCTAssertTrue(waitUntil(timeout: 5) { !backend.headers.isEmpty })
        let tlvs = TLSTests.proxyTLVs(backend.headers.first ?? [])
        XCTAssertEqual(tlvs[0x02].map { String(decoding: $0, as: UTF8.self) }, "a.example.test", "authority (SNI)")
        XCTAssertEqual(tlvs[0x01].map { String(decoding: $0, as: UTF8.self) }, "echo/1", "ALPN")
        let ssl = tlvs[0x20] ?? []
        XCTAssertGreaterThanOrEqual(ssl.count, 5)
        if ssl.count >= 5 {
            XCTAssertEqual(ssl[0] & 0x07, 0x07, "client flags: SSL, certificate on this connection")
            XCTAssertEqual(Array(ssl[1..<5]), [0, 0, 0, 0], "verified")
            let sub = TLSTests.tlvs(Array(ssl[5...]))
            XCTAssertEqual(sub[0x22].map { String(decoding: $0, as: UTF8.self) }, "client-7", "the client's common name")
            XCTAssertEqual(sub[0x21].map { String(decoding: $0, as: UTF8.self) }, "TLSv1.3")
        }

        var noCertificate = options
        noCertificate.certFile = nil
        noCertificate.keyFile = nil
        XCTAssertFalse(TLSTests.exchangeSucceeds(port: port, noCertificate), "no certificate got through")
        var stranger = options
        stranger.certFile = pki.path("stranger.pem")
        stranger.keyFile = pki.path("stranger.key")
        XCTAssertFalse(TLSTests.exchangeSucceeds(port: port, stranger), "an untrusted certificate got through")
        XCTAssertEqual(backend.headers.count, 1, "only the trusted client reached the backend")

        XCTAssertTrue(waitUntil(timeout: 5) {
            let reasons = (try? self.listenerTLS(proxy))?["client_auth_failures_by_reason"] as? [String: Int] ?? [:]
            return reasons["no_certificate"] == 1 && reasons["untrusted"] == 1
        }, "\((try? listenerTLS(proxy)) ?? [:])")
        proxy.stop()
    }

    /// With TLS 1.3 a client certificate is checked after the client's Finished, so the
    /// refusal shows at the first read: a failed exchange either way.
    static func exchangeSucceeds(port: UInt16, _ options: TLSClient.Options) -> Bool {
        guard let client = try? TLSClient(port: port, options) else { return false }
        guard (try? client.send([1])) != nil else { return false }
        return (try? client.receive(1)) == [1]
    }

    /// Must show 3: 1,000 concurrent TLS connections through 2 workers each echo 1 MiB
    /// byte-exact; a second `s_client -sess_in` resumes, on whichever worker it lands.
    func testThousandConcurrentTLSConnectionsEchoOneMiBAndSessionsResume() throws {
        let pki = try TestPKI()
        let a = try TestBackend(.echo)
        let b = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: tlsConfig(port: port, endpoints: [a.address, b.address], pki: pki), waitFor: ("127.0.0.1", port))
        try TLSTests.echoLoad(port: port, pki: pki, connections: 1000, bytes: 1 << 20, serverName: "a.example.test", timeout: 300)

        // Resumption: a session saved by one s_client resumes in the next ones (both
        // workers take some of them: SO_REUSEPORT spreads the connections).
        let stream = try TestBackend(.stream(bytes: 64, seed: 9))
        let streamPort = Sockets.freePort()
        let resuming = try L4LBProcess(
            config: tlsConfig(port: streamPort, endpoints: [stream.address], pki: pki), waitFor: ("127.0.0.1", streamPort))
        let session = pki.path("session.pem")
        // -ign_eof: s_client stays until the backend's bytes and close_notify, by when the
        // TLS 1.3 tickets have arrived.
        let first = try sClient(streamPort, ["-servername", "a.example.test", "-ign_eof", "-sess_out", session])
        XCTAssertTrue(first.contains("New, TLSv1.3"), first)
        var resumed = 0
        for _ in 0..<6 {
            let again = try sClient(streamPort, ["-servername", "a.example.test", "-ign_eof", "-sess_in", session])
            if again.contains("Reused, TLSv1.3") { resumed += 1 }
        }
        XCTAssertEqual(resumed, 6, "every s_client -sess_in resumed")
        // TLS 1.3 tickets are for one use: a resumed connection gets a fresh ticket, so a
        // client that keeps only its latest session (as wrk and most libraries do)
        // resumes again and again, each time with the ticket it was given last.
        var chained = 0
        for link in 0..<4 {
            let next = try sClient(streamPort, [
                "-servername", "a.example.test", "-ign_eof",
                "-sess_in", link == 0 ? session : pki.path("chain-\(link).pem"), "-sess_out", pki.path("chain-\(link + 1).pem"),
            ])
            if next.contains("Reused, TLSv1.3") { chained += 1 }
        }
        XCTAssertEqual(chained, 4, "each resumed connection's own ticket resumed the next")
        let tls = try listenerTLS(resuming)
        XCTAssertGreaterThanOrEqual(tls["resumed"] as? Int ?? 0, 10, "\(tls)")
        resuming.stop()
        proxy.stop()
    }

    /// Must show 5: a reload that swaps the certificate serves the new one to new
    /// connections while a connection opened before it keeps working.
    func testReloadSwapsTheCertificateAndOpenConnectionsCarryOn() throws {
        let pki = try TestPKI()
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let config = tlsConfig(port: port, endpoints: [backend.address], pki: pki)
        let proxy = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
        let options = TLSClient.Options(serverName: "a.example.test", caFile: pki.path("ca.pem"))
        let open = try TLSClient(port: port, options)
        try open.send(Array("before".utf8))
        XCTAssertEqual(try open.receive(6), Array("before".utf8))
        let before = try TLSClient(port: port, options)
        let serialBefore = TLSTests.serial(before)

        try pki.reissueA(as: "a2")
        try proxy.writeConfig(config.replacingOccurrences(of: pki.path("a.pem"), with: pki.path("a2.pem"))
            .replacingOccurrences(of: pki.path("a.key"), with: pki.path("a2.key")))
        let response = try proxy.admin("POST", "/reload")
        XCTAssertEqual(response.status, 200, response.text)
        var serialAfter = serialBefore
        XCTAssertTrue(waitUntil(timeout: 5) {
            guard let client = try? TLSClient(port: port, options) else { return false }
            serialAfter = TLSTests.serial(client)
            return serialAfter != serialBefore
        }, "new connections still get the old certificate")
        XCTAssertFalse(serialAfter.isEmpty)
        try open.send(Array("after".utf8))
        XCTAssertEqual(try open.receive(5), Array("after".utf8), "the connection opened before the reload")

        // A key that does not match its certificate fails the reload, naming the file, and
        // the running certificate stays.
        try proxy.writeConfig(config.replacingOccurrences(of: pki.path("a.key"), with: pki.path("b.key")))
        let bad = try proxy.admin("POST", "/reload")
        XCTAssertEqual(bad.status, 400, bad.text)
        let errors = bad.json["errors"] as? [String] ?? []
        XCTAssertEqual(errors, ["listeners[0].tls.certificates[0]: \(pki.path("b.key")): the key does not match the certificate in \(pki.path("a.pem"))"], bad.text)
        XCTAssertEqual(TLSTests.serial(try TLSClient(port: port, options)), serialAfter)
        proxy.stop()
    }

    static func serial(_ client: TLSClient) -> String {
        client.peerSerial ?? ""
    }

    /// Hostile load on the handshake: 300 clients that connect and never speak are closed
    /// after handshake_timeout and counted, while real clients keep completing handshakes.
    func testSilentClientsAreClosedAfterTheHandshakeTimeout() throws {
        let pki = try TestPKI()
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: tlsConfig(port: port, endpoints: [backend.address], pki: pki, tls: ["handshake_timeout: 500ms"]),
            waitFor: ("127.0.0.1", port))
        let silent = try (0..<300).map { _ in try Sockets.connect(port: port) }
        defer { silent.forEach { close($0) } }
        let start = Date()
        for i in 0..<20 {
            let client = try TLSClient(port: port, .init(serverName: "b.example.test", caFile: pki.path("ca.pem")))
            try client.send([UInt8(i)])
            XCTAssertEqual(try client.receive(1), [UInt8(i)])
        }
        var slowest: TimeInterval = 0
        for fd in silent {
            guard let closedAt = Sockets.waitForClose(fd, timeout: 5) else {
                XCTFail("a silent client stayed open")
                break
            }
            slowest = max(slowest, closedAt)
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 3, "closed within the timeout and a tick or two")
        XCTAssertTrue(waitUntil(timeout: 5) { (try? self.listenerTLS(proxy))?["handshake_timeouts"] as? Int == 300 }, "\((try? listenerTLS(proxy)) ?? [:])")
        XCTAssertEqual(backend.accepted, 20, "silent clients never reach the upstream")
        proxy.stop()
    }

    /// A worker with only 64 small buffers (all of them would fit the kernel's ring): TLS
    /// still finds buffers of its own for ciphertext and the PROXY v2 header, for 200
    /// connections at once, each echoing 64 KiB.
    func testTLSWithFewBuffersAndProxyProtocol() throws {
        let pki = try TestPKI()
        let backend = try TestBackend(.proxyProtocol)
        let port = Sockets.freePort()
        let config = "buffers: { small: 64 }\n" + tlsConfig(port: port, endpoints: [backend.address], pki: pki, listener: ["proxy_protocol: v2"], workers: 1)
        let proxy = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
        try TLSTests.echoLoad(port: port, pki: pki, connections: 200, bytes: 64 << 10, serverName: "b.example.test", timeout: 120)
        XCTAssertEqual(backend.headers.count, 200)
        let tlvs = TLSTests.proxyTLVs(backend.headers.first ?? [])
        let sub = TLSTests.tlvs(Array((tlvs[0x20] ?? [0, 0, 0, 0, 0]).dropFirst(5)))
        XCTAssertEqual(sub[0x23].map { String(decoding: $0, as: UTF8.self) }, "TLS_AES_128_GCM_SHA256", "the negotiated cipher")
        proxy.stop()
    }

    /// PROXY v2 TLVs after the address block: type → value.
    static func proxyTLVs(_ header: [UInt8]) -> [UInt8: [UInt8]] {
        guard header.count >= 16 else { return [:] }
        let addressLength = header[13] == 0x11 ? 12 : 36
        return tlvs(Array(header[(16 + addressLength)...]))
    }

    static func tlvs(_ bytes: [UInt8]) -> [UInt8: [UInt8]] {
        var out: [UInt8: [UInt8]] = [:]
        var i = 0
        while i + 3 <= bytes.count {
            let length = Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            guard i + 3 + length <= bytes.count else { break }
            out[bytes[i]] = Array(bytes[(i + 3)..<(i + 3 + length)])
            i += 3 + length
        }
        return out
    }
}
