import XCTest

/// `l4lb check` on broken configs: the exact `path: message` lines and exit 2.
final class ConfigCheckTests: XCTestCase {
    func check(_ yaml: String) throws -> (status: Int32, output: String) {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-check-\(UUID().uuidString).yaml")
        try yaml.write(to: url, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: url) }
        let result = try L4LBProcess.runCommand(["check", "--config", url.path])
        // Refused: the last line points at the docs (checked here, and left out of what the
        // tests compare).
        guard result.status == 2 else { return result }
        var lines = result.output.split(separator: "\n").map(String.init)
        XCTAssertTrue(lines.last?.hasPrefix("see docs/") == true, "no pointer to the docs after the errors: \(result.output)")
        lines.removeLast()
        return (result.status, lines.map { $0 + "\n" }.joined())
    }

    /// The pointer after the errors names the page of what they name.
    func testErrorsPointAtTheirPageOfTheDocs() throws {
        func pointer(_ yaml: String) throws -> String {
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-check-\(UUID().uuidString).yaml")
            try yaml.write(to: url, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: url) }
            let result = try L4LBProcess.runCommand(["check", "--config", url.path])
            XCTAssertEqual(result.status, 2, result.output)
            return result.output.split(separator: "\n").last.map(String.init) ?? ""
        }
        let listener = { (extra: String) in Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n" + extra) }
        XCTAssertEqual(try pointer(listener("    conect_timeout: 2s")), "see docs/configuration.md")
        XCTAssertEqual(try pointer(listener("    tls: { certificates: [] }")), "see docs/tls.md")
        XCTAssertEqual(try pointer(listener("    rate_limit: { per_source: { rate: 1 } }")), "see docs/filter-and-rate-limits.md")
        XCTAssertEqual(try pointer(Self.valid + "\nfilter: { drop: [] }\nxds: { sever: x }\n"),
                       "see docs/filter-and-rate-limits.md, docs/discovery.md")
    }

    static let valid = """
        listeners:
          - name: web
            address: 127.0.0.1:8080
            cluster: web
        clusters:
          - name: web
            endpoints:
              - { address: 127.0.0.1:9001 }
        """

    func testValidConfigIsOK() throws {
        let (status, output) = try check(Self.valid)
        XCTAssertEqual(status, 0, output)
        XCTAssertEqual(output, "configuration OK\n")
    }

    func testTenBrokenConfigsNameTheFieldAndExit2() throws {
        let cases: [(String, [String])] = [
            // 1. Port out of range (the DESIGN example).
            (Self.valid.replacingOccurrences(of: "127.0.0.1:9001", with: "127.0.0.1:70000"),
             ["clusters[0].endpoints[0].address: port 70000 out of range"]),
            // 2. Unknown key.
            (Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n    conect_timeout: 2s"),
             ["listeners[0].conect_timeout: unknown key"]),
            // 3. Bad duration.
            (Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n    idle_timeout: 5x"),
             ["listeners[0].idle_timeout: invalid duration \"5x\" (use e.g. 500ms, 2s, 5m, 1h)"]),
            // 4. Dangling cluster reference.
            (Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: api"),
             ["listeners[0].cluster: unknown cluster \"api\""]),
            // 5. Duplicate cluster names.
            (Self.valid + "\n  - name: web\n    endpoints:\n      - { address: 127.0.0.1:9002 }",
             ["clusters[1].name: duplicate cluster name \"web\" (also clusters[0])"]),
            // 6. Bad IP address.
            (Self.valid.replacingOccurrences(of: "address: 127.0.0.1:8080", with: "address: 300.1.2.3:8080"),
             ["listeners[0].address: invalid IP address \"300.1.2.3\""]),
            // 7. Missing endpoints and missing listener address.
            ("listeners:\n  - cluster: web\nclusters:\n  - name: web\n",
             ["clusters[0].endpoints: required (or dns:)", "listeners[0].address: required"]),
            // 8. Wrong type and out-of-range integer.
            (Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n    connect_attempts: many\n    max_connections: 0"),
             ["listeners[0].connect_attempts: expected an integer, got \"many\"", "listeners[0].max_connections: 0 out of range 1...10000000"]),
            // 9. Unknown enum value.
            (Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n    proxy_protocol: v3"),
             ["listeners[0].proxy_protocol: must be one of none, v1, v2, got \"v3\""]),
            // 10. Several problems at once, all reported.
            ("workers: lots\nbogus: 1\nlisteners:\n  - address: \"[::1]\"\n    cluster: web\nclusters:\n  - name: web\n    endpoints:\n      - { address: 127.0.0.1:9001, weight: -1 }\n",
             ["bogus: unknown key", "workers: expected an integer, got \"lots\"",
              "clusters[0].endpoints[0].weight: -1 out of range 0...1000000",
              "listeners[0].address: expected ip:port or [ipv6]:port, got \"[::1]\""]),
        ]
        for (i, (yaml, expected)) in cases.enumerated() {
            let (status, output) = try check(yaml)
            XCTAssertEqual(status, 2, "case \(i + 1): \(output)")
            XCTAssertEqual(output.split(separator: "\n").map(String.init), expected, "case \(i + 1)")
        }
    }

    func testMissingFileIsAClearError() throws {
        let (status, output) = try L4LBProcess.runCommand(["check", "--config", "/nonexistent/l4lb.yaml"])
        XCTAssertEqual(status, 2)
        XCTAssertTrue(output.hasPrefix("/nonexistent/l4lb.yaml: "), output)
    }

    /// TLS material is checked by `check`: a missing file, a file with no certificate, a
    /// key that is not its certificate's, a bad CA — each names the file; routes and tls
    /// together, and bad server names, name the field.
    func testBadTLSMaterialNamesTheFile() throws {
        let pki = try TestPKI()
        let garbage = pki.path("garbage.pem")
        try "not a certificate\n".write(toFile: garbage, atomically: true, encoding: .utf8)
        func listener(_ extra: String) -> String {
            Self.valid.replacingOccurrences(of: "    cluster: web", with: "    cluster: web\n" + extra)
        }
        let encrypted = pki.path("encrypted.key")
        let made = try ChildProcess.run("/usr/bin/openssl", ["pkey", "-in", pki.path("a.key"), "-aes256", "-passout", "pass:secret", "-out", encrypted])
        XCTAssertEqual(made.status, 0, made.output)
        let cases: [(String, [String])] = [
            (listener("    tls: { certificates: [{ cert: \(pki.path("a.pem")), key: \(encrypted) }] }"),
             ["listeners[0].tls.certificates[0]: \(encrypted): the key is encrypted; l4lb needs it unencrypted (openssl pkey -in KEY -out KEY.plain)"]),
            (listener("    tls: { certificates: [{ cert: /nonexistent/a.pem, key: \(pki.path("a.key")) }] }"),
             ["listeners[0].tls.certificates[0]: /nonexistent/a.pem: cannot read file"]),
            (listener("    tls: { certificates: [{ cert: \(garbage), key: \(pki.path("a.key")) }] }"),
             ["listeners[0].tls.certificates[0]: \(garbage): no PEM certificate (error:0480006C:PEM routines::no start line)"]),
            (listener("    tls: { certificates: [{ cert: \(pki.path("a.pem")), key: \(pki.path("b.key")) }] }"),
             ["listeners[0].tls.certificates[0]: \(pki.path("b.key")): the key does not match the certificate in \(pki.path("a.pem"))"]),
            (listener("    tls: { certificates: [{ cert: \(pki.path("a.pem")), key: \(pki.path("a.key")) }], client_auth: { ca: \(garbage) }, min_version: \"1.4\" }"),
             ["listeners[0].tls.client_auth.ca: \(garbage): no PEM certificate",
              "listeners[0].tls.min_version: must be one of 1.0, 1.1, 1.2, 1.3, got \"1.4\""]),
            (listener("    tls: { certificates: [{ cert: \(pki.path("a.pem")), key: \(pki.path("a.key")) }] }\n    routes: [{ server_names: [\"bad name\", a.test, A.TEST], cluster: web }]"),
             ["listeners[0].routes: routes pass TLS through by server name; set either tls or routes, not both",
              "listeners[0].routes[0].server_names[0]: \"bad name\" is not a host name or *.suffix",
              "listeners[0].routes[0].server_names[2]: \"A.TEST\" is already routed by listeners[0].routes[0].server_names[1]"]),
        ]
        for (yaml, expected) in cases {
            let (status, output) = try check(yaml)
            XCTAssertEqual(status, 2, output)
            XCTAssertEqual(Set(output.split(separator: "\n").map(String.init)), Set(expected), yaml)
        }
    }
}
