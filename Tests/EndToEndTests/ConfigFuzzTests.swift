import Foundation
import L4Balancer
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The config parser and validator under a property-based fuzzer (issue 34, must-show 1):
/// a seeded generator puts boundary, overflowing, malformed and hostile values into every
/// field of a config that sets nearly all of them. Properties: nothing traps; every
/// rejection names a path; every accepted config builds its snapshot; every value `check`
/// accepts also runs in a real l4lb; a reload of any rejected file leaves the old config
/// serving.
final class ConfigFuzzTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// The blocklist's pinned maps for these tests alone.
    static let pinPath = "/sys/fs/bpf/l4lb-fuzz-\(getpid())"

    override class func tearDown() {
        try? FileManager.default.removeItem(atPath: pinPath)
    }

    struct Ports {
        var admin: UInt16, web: UInt16, split: UInt16, sni: UInt16, dns: UInt16, plain: UInt16
        var endpoints: [UInt16], udpEndpoint: UInt16

        static func placeholders() -> Ports {
            Ports(admin: 9901, web: 18080, split: 18081, sni: 18082, dns: 18053, plain: 18083, endpoints: [19001, 19002, 19003], udpEndpoint: 19053)
        }
    }

    /// A config that sets nearly every field (TLS aside: it needs files), every scalar as a
    /// leaf the mutator can reach.
    static func base(_ p: Ports, pinPath: String = ConfigFuzzTests.pinPath) -> ConfigTree {
        func s(_ text: String) -> ConfigTree { .scalar(text) }
        func endpoint(_ port: UInt16, weight: String = "1") -> ConfigTree {
            .map([("address", s("127.0.0.1:\(port)")), ("weight", s(weight)), ("max_connections", s("1000"))])
        }
        let tcpCheck: ConfigTree = .map([
            ("type", s("tcp")), ("interval", s("1s")), ("timeout", s("500ms")), ("healthy_threshold", s("2")),
            ("unhealthy_threshold", s("3")), ("initial_jitter", s("100ms")), ("interval_jitter", s("100ms")),
        ])
        return .map([
            ("workers", s("2")),
            ("drain_timeout", s("5s")),
            ("admin", .map([
                ("address", s("127.0.0.1:\(p.admin)")), ("allowed_hosts", .list([s("lb.example")])),
                ("max_connections", s("64")), ("idle_timeout", s("10s")), ("request_timeout", s("10s")),
            ])),
            ("access_log", .map([("path", s("/dev/null")), ("format", s("json"))])),
            ("buffers", .map([("small", s("1024")), ("small_size", s("16KiB")), ("large", s("16")), ("large_size", s("1MiB"))])),
            ("rate_limit", .map([
                ("per_source", .map([
                    ("new_connections", .map([("rate", s("1000/s")), ("burst", s("2000"))])),
                    ("max_connections", s("500")), ("prefix_v4", s("32")), ("prefix_v6", s("64")),
                ])),
                ("exempt", .list([s("192.0.2.0/24")])), ("table_size", s("65536")),
            ])),
            ("filter", .map([
                ("xdp", .map([("interfaces", .list([])), ("pin_path", s(pinPath))])),
                ("block_sources", .list([s("192.0.2.0/24"), s("2001:db8::/32")])), ("allow_sources", .list([s("192.0.2.7/32")])),
                ("block_ports", .list([s("tcp/23"), s("udp/19")])),
            ])),
            ("listeners", .list([
                .map([
                    ("name", s("web")), ("address", s("127.0.0.1:\(p.web)")), ("protocol", s("tcp")), ("cluster", s("web")),
                    ("connect_timeout", s("2s")), ("connect_attempts", s("3")), ("idle_timeout", s("5m")), ("send_timeout", s("30s")),
                    ("max_connections", s("10000")), ("proxy_protocol", s("none")),
                ]),
                .map([
                    ("name", s("split")), ("address", s("127.0.0.1:\(p.split)")),
                    ("clusters", .list([.map([("name", s("web")), ("weight", s("95"))]), .map([("name", s("ring")), ("weight", s("5"))])])),
                    ("rate_limit", s("off")),
                ]),
                .map([
                    ("name", s("sni")), ("address", s("127.0.0.1:\(p.sni)")), ("cluster", s("web")), ("inspect_timeout", s("5s")),
                    ("routes", .list([.map([("server_names", .list([s("a.example"), s("*.b.example")])), ("cluster", s("least"))])])),
                ]),
                .map([("name", s("plain")), ("address", s("127.0.0.1:\(p.plain)")), ("cluster", s("ring"))]),
                .map([
                    ("name", s("dns")), ("address", s("127.0.0.1:\(p.dns)")), ("protocol", s("udp")), ("cluster", s("dns")),
                    ("idle_timeout", s("30s")), ("max_sessions", s("1000")), ("session", s("client")), ("relay", s("user")),
                ]),
            ])),
            ("clusters", .list([
                .map([
                    ("name", s("web")), ("balancer", s("maglev")), ("hash_key", s("source_ip")), ("table_size", s("65537")),
                    ("endpoints", .list(p.endpoints.map { endpoint($0) })), ("health_check", tcpCheck),
                    ("outlier_detection", .map([
                        ("consecutive_failures", s("5")), ("ejection_time", s("30s")), ("max_ejection_time", s("300s")),
                        ("max_ejection_percent", s("50")),
                    ])),
                    ("max_connections", s("10000")), ("on_unhealthy", s("close")),
                ]),
                .map([
                    ("name", s("ring")), ("balancer", s("ring_hash")), ("hash_key", s("source_ip_port")), ("minimum_ring_size", s("1024")),
                    ("hash_balance_factor", s("125")), ("endpoints", .list(p.endpoints.map { endpoint($0, weight: "2") })),
                ]),
                .map([
                    ("name", s("least")), ("balancer", s("least_request")), ("choice_count", s("2")), ("active_request_bias", s("1.0")),
                    ("slow_start", s("10s")), ("endpoints", .list(p.endpoints.map { endpoint($0) })),
                    ("health_check", .map([
                        ("type", s("http")), ("path", s("/")), ("host", s("web.example")), ("interval", s("2s")), ("timeout", s("1s")),
                    ])),
                ]),
                .map([
                    ("name", s("dns")), ("balancer", s("random")), ("endpoints", .list([endpoint(p.udpEndpoint)])),
                    ("health_check", .map([("type", s("dns")), ("query", s("example.com")), ("interval", s("1s")), ("timeout", s("500ms"))])),
                ]),
            ])),
        ])
    }

    /// Must-show 1, the in-process half: mutated configs for a bounded time (25 s in CI;
    /// `L4LB_FUZZ_SECONDS` for a longer run, `L4LB_FUZZ_SEED` to replay one). The input
    /// being parsed is written to a file first, so a trap leaves it behind.
    func testMutatedConfigsNeverTrapAndEveryVerdictIsWhole() throws {
        let environment = ProcessInfo.processInfo.environment
        let seconds = environment["L4LB_FUZZ_SECONDS"].flatMap(Double.init) ?? 25
        let seed = environment["L4LB_FUZZ_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        var random = SeededRandom(seed: seed)
        let mutator = ConfigMutator(base: ConfigFuzzTests.base(.placeholders()))
        XCTAssertNoThrow(try ConfigParser.parse(yaml: mutator.base.yaml).get(), "the fuzzer's base config must itself be valid")
        let lastInput = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-config-fuzz-input.yaml")
        var tried = 0, accepted = 0, rejected = 0
        let deadline = Date().addingTimeInterval(seconds)
        print("config fuzz: seed \(seed); the input being parsed is kept in \(lastInput.path)")
        while Date() < deadline {
            let yaml = mutator.mutate(&random).document
            try? yaml.write(to: lastInput, atomically: false, encoding: .utf8)
            tried += 1
            switch ConfigParser.parse(yaml: yaml) {
            case .success(let config):
                accepted += 1
                // What `run` builds first from a config: identities, balancers, tables.
                _ = Snapshot(config: config)
            case .failure(let errors):
                rejected += 1
                XCTAssertFalse(errors.errors.isEmpty, "a rejection with no error: \(yaml)")
                for error in errors.errors where error.message.isEmpty {
                    XCTFail("an error without a message at \(error.path): \(yaml)")
                }
            }
        }
        print("config fuzz: \(tried) inputs in \(Int(seconds)) s, \(accepted) accepted, \(rejected) rejected, 0 traps (seed \(seed))")
        XCTAssertGreaterThan(accepted, 0, "the mutations never left a config valid: the fuzzer only tests rejections")
        XCTAssertGreaterThan(rejected, tried / 4)
        try? FileManager.default.removeItem(at: lastInput)
    }

    /// The fields that used to trap, each at the value that did: `check` refuses them with
    /// their path, and nothing in between traps.
    func testOverflowingValuesAreRefusedWithTheirPath() throws {
        let p = Ports.placeholders()
        let cases: [(String, [ConfigTree.PathStep])] = [
            ("listeners[0].idle_timeout", [.key("listeners"), .index(0), .key("idle_timeout")]),
            ("listeners[0].send_timeout", [.key("listeners"), .index(0), .key("send_timeout")]),
            ("listeners[0].connect_timeout", [.key("listeners"), .index(0), .key("connect_timeout")]),
            ("listeners[2].inspect_timeout", [.key("listeners"), .index(2), .key("inspect_timeout")]),
            ("listeners[4].idle_timeout", [.key("listeners"), .index(4), .key("idle_timeout")]),
            ("clusters[0].health_check.interval", [.key("clusters"), .index(0), .key("health_check"), .key("interval")]),
            ("clusters[0].health_check.timeout", [.key("clusters"), .index(0), .key("health_check"), .key("timeout")]),
            ("clusters[0].health_check.initial_jitter", [.key("clusters"), .index(0), .key("health_check"), .key("initial_jitter")]),
            ("drain_timeout", [.key("drain_timeout")]),
        ]
        for (name, path) in cases {
            for value in ["9223372036854775807ms", "721h", "2592000001ms"] {
                let yaml = ConfigFuzzTests.base(p).replacing(path, with: .scalar(value)).yaml
                guard case .failure(let errors) = ConfigParser.parse(yaml: yaml) else {
                    XCTFail("\(name): \(value) accepted")
                    continue
                }
                XCTAssertTrue(errors.errors.contains { $0.path == name && $0.message.contains("720h") }, "\(name) \(value): \(errors.errors)")
            }
            // A check's timeout (≤ 5m) and first jitter (≤ interval) have tighter ranges.
            guard !name.hasSuffix(".timeout"), !name.hasSuffix(".initial_jitter") else { continue }
            let yaml = ConfigFuzzTests.base(p).replacing(path, with: .scalar("720h")).yaml
            XCTAssertNoThrow(try ConfigParser.parse(yaml: yaml).get(), "\(name): 720h is the longest duration and must be taken")
        }
        let size = [ConfigTree.PathStep.key("buffers"), .key("small_size")]
        for value in ["9007199254740993K", "9007199254740993KiB", "8796093022208MiB"] {
            guard case .failure(let errors) = ConfigParser.parse(yaml: ConfigFuzzTests.base(p).replacing(size, with: .scalar(value)).yaml) else {
                XCTFail("buffers.small_size: \(value) accepted")
                continue
            }
            XCTAssertEqual(errors.errors.map(\.path), ["buffers.small_size"])
        }
    }

    /// Must-show 4's second half: a NUL (or any control character) in an address, name or
    /// entry is refused with its path, never cut short by a C call.
    func testControlCharactersAreRefusedWithTheirPath() throws {
        let p = Ports.placeholders()
        let cases: [([ConfigTree.PathStep], String, String)] = [
            ([.key("listeners"), .index(0), .key("address")], "127.0.0.1\u{0}evil.example:28080", "listeners[0].address"),
            ([.key("clusters"), .index(0), .key("endpoints"), .index(0), .key("address")], "127.0.0.1:19001\u{0}", "clusters[0].endpoints[0].address"),
            ([.key("filter"), .key("block_sources"), .index(0)], "127.0.0.2\u{0}junk/32", "filter.block_sources[0]"),
            ([.key("rate_limit"), .key("exempt"), .index(0)], "192.0.2.0\u{0}/24", "rate_limit.exempt[0]"),
            ([.key("listeners"), .index(0), .key("name")], "web\nevil", "listeners[0].name"),
            ([.key("admin"), .key("address")], "127.0.0.1\u{0}:9901", "admin.address"),
        ]
        for (path, value, name) in cases {
            let yaml = ConfigFuzzTests.base(p).replacing(path, with: .scalar(value)).yaml
            guard case .failure(let errors) = ConfigParser.parse(yaml: yaml) else {
                XCTFail("\(name): \(value.debugDescription) accepted")
                continue
            }
            XCTAssertTrue(errors.errors.contains { $0.path == name && $0.message.contains("control character") }, "\(name): \(errors.errors)")
        }
        // A health check's payload is bytes, not a name: "PING\r\n" is what it should send.
        let check: ConfigTree = .map([("type", .scalar("send_expect")), ("send", .scalar("PING\r\n")), ("expect", .scalar("+PONG\r\n"))])
        let yaml = ConfigFuzzTests.base(p).replacing([.key("clusters"), .index(1), .key("hash_balance_factor")], with: nil)
            .adding(key: "health_check", check, at: [.key("clusters"), .index(1)]).yaml
        XCTAssertNoThrow(try ConfigParser.parse(yaml: yaml).get())
    }

    /// `check` refuses what `run` would: more listeners, clusters or endpoints than one
    /// process can number, each with its path.
    func testCheckRefusesWhatRunCannotHold() throws {
        let listeners = (0...1024).map { "  - { name: l\($0), address: 127.0.0.1:\(20000 + $0), cluster: c }" }.joined(separator: "\n")
        let yaml = "listeners:\n\(listeners)\nclusters:\n  - { name: c, endpoints: [{ address: 127.0.0.1:9 }] }\n"
        guard case .failure(let errors) = ConfigParser.parse(yaml: yaml) else { return XCTFail("1,025 listeners accepted") }
        XCTAssertEqual(errors.errors.map(\.description), ["listeners: 1025 listeners; at most 1024"])
        let endpoints = (0..<300).map { "{ address: 127.0.0.\($0 / 250 + 1):\(1000 + $0) }" }.joined(separator: ", ")
        let clusters = (0..<220).map { "  - { name: c\($0), endpoints: [\(endpoints)] }" }.joined(separator: "\n")
        let many = "listeners:\n  - { address: 127.0.0.1:8080, cluster: c0 }\nclusters:\n\(clusters)\n"
        guard case .failure(let tooMany) = ConfigParser.parse(yaml: many) else { return XCTFail("66,000 endpoints accepted") }
        XCTAssertEqual(tooMany.errors.map(\.description), ["clusters: 66000 endpoints in all; at most 65536"])
        // Buffer pools whose address space no process has (run once failed with ENOMEM).
        let listener = "listeners: [{ address: 127.0.0.1:8080, cluster: c }]\nclusters: [{ name: c, endpoints: [{ address: 127.0.0.1:9 }] }]\n"
        for (head, message) in [
            ("workers: 2\nbuffers: { large: 65536, large_size: 64MiB }", "MiB a worker; at most 64 GiB"),
            ("workers: 1024\nbuffers: { small: 40000, small_size: 1MiB }", "GiB; at most 32 TiB in all"),
        ] {
            guard case .failure(let errors) = ConfigParser.parse(yaml: head + "\n" + listener) else { return XCTFail("\(head) accepted") }
            XCTAssertTrue(errors.errors.count == 1 && errors.errors[0].path == "buffers" && errors.errors[0].message.contains(message), "\(errors.errors)")
        }
        XCTAssertNoThrow(try ConfigParser.parse(yaml: "workers: 1024\n" + listener).get(), "1,024 workers with the default pools run")
    }

    /// A config file past 8 MiB is refused before it is read, by `check` and by a reload,
    /// at once and without the process growing (a 50 MB file once took 18 s and 1.4 GB).
    func testAnOversizedConfigFileIsRefusedBeforeItIsParsed() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let yaml = "listeners:\n  - { address: 127.0.0.1:\(port), cluster: c }\nclusters:\n  - { name: c, endpoints: [{ address: \(backend.address) }] }\n"
        let l4lb = try L4LBProcess(config: yaml, waitFor: ("127.0.0.1", port))
        defer { l4lb.stop() }
        let written = try String(contentsOf: l4lb.configURL, encoding: .utf8)
        let huge = written + "# " + String(repeating: "x", count: 9 << 20) + "\n"
        try huge.write(to: l4lb.configURL, atomically: true, encoding: .utf8)
        let rss = l4lb.resources.rssKiB
        let started = Date()
        let reload = try l4lb.admin("POST", "/reload")
        XCTAssertEqual(reload.status, 400)
        XCTAssertTrue(reload.text.contains("a config file may be at most 8388608 bytes"), reload.text)
        XCTAssertLessThan(Date().timeIntervalSince(started), 2)
        XCTAssertLessThan(l4lb.resources.rssKiB - rss, 8 * 1024, "refusing the file grew the process")
        let check = try L4LBProcess.runCommand(["check", "--config", l4lb.configURL.path])
        XCTAssertEqual(check.status, 2)
        XCTAssertTrue(check.output.contains("at most 8388608 bytes"), check.output)
    }

    /// Must-show 1, the running half. A real l4lb starts from the base config; then, for
    /// every leaf and every value of its pool, the file is rewritten and reloaded:
    /// - a value `check` accepts must reload, or be refused only as a setting that needs a
    ///   restart, and the process serves after it;
    /// - a value `check` refuses must be refused by the reload with the same errors, and the
    ///   old config goes on serving (the generation does not move, bytes still echo).
    /// Finally a fresh process starts with every field at the largest value accepted.
    func testEveryAcceptedValueRunsAndEveryRejectedReloadKeepsTheOldConfig() throws {
        let backends = try (0..<3).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let udp = try UDPBackend(.echo)
        defer { udp.stop() }
        let ports = Ports(admin: Sockets.freePort(), web: Sockets.freePort(), split: Sockets.freePort(), sni: Sockets.freePort(),
                          dns: Sockets.freePort(), plain: Sockets.freePort(), endpoints: backends.map(\.port), udpEndpoint: udp.port)
        let mutator = ConfigMutator(base: ConfigFuzzTests.base(ports))
        let l4lb = try L4LBProcess(config: mutator.base.document, waitFor: ("127.0.0.1", ports.web))
        defer { l4lb.stop() }

        func echoes(_ port: UInt16? = nil) -> Bool {
            guard let fd = try? Sockets.connect(port: port ?? ports.web) else { return false }
            defer { close(fd) }
            Sockets.setTimeout(fd, seconds: 5)
            guard (try? Sockets.sendAll(fd, Array("ping".utf8))) != nil else { return false }
            return (try? Sockets.receiveExactly(fd, 4)) == Array("ping".utf8)
        }
        XCTAssertTrue(echoes())
        var accepted = 0, refusedForRestart = 0, rejected = 0, largest: [String: (Double, ConfigTree)] = [:]
        var random = SeededRandom(seed: 34)
        let boundaries = mutator.boundaries(perLeaf: 3, &random)
        for (index, (path, value, tree)) in boundaries.enumerated() {
            let yaml = tree.document
            let verdict = ConfigParser.parse(yaml: yaml)
            try yaml.write(to: l4lb.configURL, atomically: true, encoding: .utf8)
            let before = try l4lb.stats().int("generation")
            let reload = try l4lb.admin("POST", "/reload")
            XCTAssertTrue(l4lb.process.isRunning, "l4lb died reloading \(path) = \(value.debugDescription); log:\n\(l4lb.log.suffix(3000))")
            guard l4lb.process.isRunning else { return }
            let errors = (reload.json["errors"] as? [String]) ?? []
            switch verdict {
            case .success:
                if reload.status == 200 {
                    accepted += 1
                    // Numbers, durations and sizes only (units applied): an address is no "largest".
                    if let number = ConfigValues.magnitude(value), number > (largest[path]?.0 ?? -1) {
                        largest[path] = (number, tree)
                    }
                } else {
                    // Only what a running process cannot take on may refuse an accepted file.
                    XCTAssertTrue(!errors.isEmpty && errors.allSatisfy { $0.contains("restart l4lb to apply") || $0.contains("in use") || $0.contains("bind") },
                                  "\(path) = \(value.debugDescription): check accepts it, the reload refused it: \(reload.text)")
                    refusedForRestart += 1
                }
            case .failure(let expected):
                rejected += 1
                XCTAssertEqual(reload.status, 400, "\(path) = \(value.debugDescription) is invalid and was reloaded: \(reload.text)")
                XCTAssertEqual(Set(errors), Set(expected.errors.map(\.description)), "\(path) = \(value.debugDescription)")
                XCTAssertEqual(try l4lb.stats().int("generation"), before, "a refused reload moved the generation")
            }
            // Every so often, and after every refusal, the old or new config serves.
            if case .failure = verdict, index % 7 == 0 { XCTAssertTrue(echoes(), "not serving after refusing \(path) = \(value.debugDescription)") }
        }
        try mutator.base.document.write(to: l4lb.configURL, atomically: true, encoding: .utf8)
        XCTAssertEqual(try l4lb.admin("POST", "/reload").status, 200)
        XCTAssertTrue(echoes(), "not serving after \(boundaries.count) reloads")
        print("config reloads: \(boundaries.count) files, \(accepted) reloaded, \(refusedForRestart) refused as restart-only, \(rejected) rejected and the old config kept")
        XCTAssertGreaterThan(accepted, 100)
        XCTAssertGreaterThan(rejected, 100)
        l4lb.stop()

        // Every field at the largest value that reloaded, in one file, from a cold start.
        var extreme = mutator.base
        for path in extreme.paths() {
            guard let (_, tree) = largest[ConfigTree.name(path)], let value = tree[path] else { continue }
            let candidate = extreme.replacing(path, with: value)
            // Fields constrain each other (max_ejection_time ≥ ejection_time …): keep only
            // what leaves the whole valid.
            if case .success = ConfigParser.parse(yaml: candidate.yaml) { extreme = candidate }
        }
        let cold = try L4LBProcess(config: extreme.document, waitFor: ("127.0.0.1", ports.web))
        defer { cold.stop() }
        XCTAssertTrue(waitUntil(timeout: 5) { echoes() && echoes(ports.plain) }, "a config of largest values does not serve; log:\n\(cold.log.suffix(3000))")
        XCTAssertEqual(try cold.admin("GET", "/healthz").status, 200)
        XCTAssertEqual((try cold.stats()["listeners"] as? [Any])?.count, 5)
        print("cold start with the largest accepted values: \(extreme.document)")
    }
}
