import CTestSupport
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The blocklist (issue 14), with the real XDP program on loopback and on veth inside
/// network namespaces the tests create, and the user-space fallback on the same cases.
final class FilterTests: XCTestCase {
    var pinPath = ""

    override func setUp() {
        pinPath = "/sys/fs/bpf/l4lb-e2e-\(getpid())-\(UUID().uuidString.prefix(8))"
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: pinPath)
    }

    // MARK: The verdict table, under XDP and in user space

    /// Ports and the config both modes run.
    struct Scenario {
        let backend: TestBackend
        let v4: UInt16, v6: UInt16, blockedTCP: UInt16, blockedUDP: UInt16

        init() throws {
            backend = try TestBackend(.echo)
            v4 = Sockets.freePort()
            v6 = Sockets.freePort()
            blockedTCP = Sockets.freePort()
            blockedUDP = Sockets.freePort()
        }

        func config(mode: String, pinPath: String, interfaces: String = "[lo]") -> String {
            """
            workers: 2
            listeners:
              - { name: web, address: 127.0.0.1:\(v4), cluster: echo }
              - { name: web6, address: "[2001:db8::5]:\(v6)", cluster: echo }
              - { name: closed-port, address: 127.0.0.1:\(blockedTCP), cluster: echo }
            clusters:
              - name: echo
                endpoints: [ { address: 127.0.0.1:\(backend.port) } ]
            filter:
              xdp: { interfaces: \(interfaces), mode: \(mode), pin_path: \(pinPath) }
              block_sources: [127.0.0.2, 127.0.3.0/24, "2001:db8::6/128"]
              allow_sources: [127.0.3.7]
              block_ports: [tcp/\(blockedTCP), udp/\(blockedUDP)]
            """
        }

        /// (source, host, port, served?) — the same table for every mode.
        var cases: [(source: String, host: String, port: UInt16, served: Bool)] {
            [
                ("127.0.0.1", "127.0.0.1", v4, true),
                ("127.0.0.2", "127.0.0.1", v4, false),        // blocked /32
                ("127.0.3.9", "127.0.0.1", v4, false),        // inside a blocked /24
                ("127.0.3.7", "127.0.0.1", v4, true),         // allowed inside it
                ("2001:db8::5", "2001:db8::5", v6, true),
                ("2001:db8::6", "2001:db8::5", v6, false),    // blocked /128
                ("127.0.0.1", "127.0.0.1", blockedTCP, false), // tcp/PORT
            ]
        }
    }

    /// A namespace with loopback up and two IPv6 documentation addresses on it.
    func loopbackNamespace(_ tag: String) throws -> NetworkNamespace {
        let namespace = try NetworkNamespace(tag)
        for address in ["2001:db8::5/128", "2001:db8::6/128"] {
            try namespace.ip(["addr", "add", address, "dev", "lo", "nodad"])
        }
        return namespace
    }

    /// Runs the table; returns the listeners' accepted totals before and after.
    func checkVerdicts(_ scenario: Scenario, _ proxy: L4LBProcess, blockedOutcome: FilterTraffic.Outcome) throws {
        let acceptedBefore = scenario.backend.accepted
        let stats = try proxy.stats()
        let before = ["web", "web6", "closed-port"].map { stats.listener($0)?.int("total") ?? -1 }
        var served = 0
        for c in scenario.cases {
            let outcome = FilterTraffic.attempt(host: c.host, port: c.port, source: c.source)
            XCTAssertEqual(outcome, c.served ? .served : blockedOutcome, "\(c.source) → \(c.host):\(c.port)")
            if c.served { served += 1 }
        }
        // No byte of a blocked connection reached the upstream, and l4lb counted none of
        // them as accepted.
        XCTAssertEqual(scenario.backend.accepted - acceptedBefore, served)
        let after = try proxy.stats()
        let totals = ["web", "web6", "closed-port"].map { after.listener($0)?.int("total") ?? -1 }
        XCTAssertEqual(zip(totals, before).map { $0 - $1 }, [2, 1, 0])
    }

    /// Must-show 1 and 3: XDP on `lo` in a fresh namespace.
    func testXDPOnLoopbackDropsBlockedSourcesAndPortsBeforeL4LBSeesThem() throws {
        let namespace = try loopbackNamespace("xdp-lo")
        try namespace.run {
            let scenario = try Scenario()
            let proxy = try L4LBProcess(config: scenario.config(mode: "auto", pinPath: pinPath), waitFor: ("127.0.0.1", scenario.v4))
            defer { proxy.stop() }
            let filter = try proxy.stats().filter
            XCTAssertEqual(filter["mode"] as? String, "xdp")
            XCTAssertEqual((filter["interfaces"] as? [[String: Any]])?.first?["mode"] as? String, "generic", "lo has no native XDP")
            XCTAssertNotNil(try namespace.xdpProgramID("lo"))

            try checkVerdicts(scenario, proxy, blockedOutcome: .noConnection)

            // At scale: 200 connections at once from a blocked source. None completes a
            // handshake, l4lb accepts none, and every SYN is counted as an XDP drop.
            let droppedBefore = try proxy.stats().filterCount("lo", dropped: "blocked_source_v4")
            let acceptedBefore = try proxy.stats().listener("web")?.int("total") ?? -1
            XCTAssertEqual(FilterTraffic.connectMany(host: "127.0.0.1", port: scenario.v4, source: "127.0.0.2", count: 200, timeout: 1.5), 0)
            let after = try proxy.stats()
            XCTAssertGreaterThanOrEqual(after.filterCount("lo", dropped: "blocked_source_v4") - droppedBefore, 200)
            XCTAssertEqual(after.listener("web")?.int("total"), acceptedBefore)
            XCTAssertGreaterThanOrEqual(after.filterCount("lo", dropped: "blocked_source_v6"), 1)
            XCTAssertGreaterThanOrEqual(after.filterCount("lo", dropped: "blocked_port_tcp"), 1)
            XCTAssertGreaterThanOrEqual(after.filterCount("lo", passed: "allowed"), 1)
            XCTAssertGreaterThan(after.filterCount("lo", passed: "no_match"), 0)

            // UDP: a blocked source's datagrams never arrive; the udp/PORT rule blocks that
            // UDP port only, and the tcp/PORT rule leaves UDP on that port alone.
            let sink = try FilterTraffic.udpSocket(host: "127.0.0.1")
            defer { close(sink) }
            let sinkPort = Sockets.localPort(sink)
            try FilterTraffic.sendDatagrams(from: "127.0.0.2", to: "127.0.0.1", port: sinkPort, count: 100)
            XCTAssertEqual(FilterTraffic.receivedDatagrams(sink), 0)
            try FilterTraffic.sendDatagrams(from: "127.0.0.1", to: "127.0.0.1", port: sinkPort, count: 100)
            XCTAssertEqual(FilterTraffic.receivedDatagrams(sink), 100)

            let udpBlocked = try FilterTraffic.udpSocket(host: "127.0.0.1", port: scenario.blockedUDP)
            defer { close(udpBlocked) }
            try FilterTraffic.sendDatagrams(from: "127.0.0.1", to: "127.0.0.1", port: scenario.blockedUDP, count: 50)
            XCTAssertEqual(FilterTraffic.receivedDatagrams(udpBlocked), 0)
            let tcpOnUDPPort = try Sockets.listen(host: "127.0.0.1", port: scenario.blockedUDP)
            defer { close(tcpOnUDPPort) }
            let client = try Sockets.connect(host: "127.0.0.1", port: scenario.blockedUDP, timeout: 2)
            close(client)

            let udpOnTCPPort = try FilterTraffic.udpSocket(host: "127.0.0.1", port: scenario.blockedTCP)
            defer { close(udpOnTCPPort) }
            try FilterTraffic.sendDatagrams(from: "127.0.0.1", to: "127.0.0.1", port: scenario.blockedTCP, count: 50)
            XCTAssertEqual(FilterTraffic.receivedDatagrams(udpOnTCPPort), 50)

            let final = try proxy.stats()
            XCTAssertGreaterThanOrEqual(final.filterCount("lo", dropped: "blocked_source_v4") - after.filterCount("lo", dropped: "blocked_source_v4"), 100)
            XCTAssertGreaterThanOrEqual(final.filterCount("lo", dropped: "blocked_port_udp"), 50)

            // The same counters in Prometheus form.
            let metrics = try proxy.admin("GET", "/metrics").text
            XCTAssertTrue(metrics.contains(#"l4lb_filter_dropped_packets_total{interface="lo",mode="generic",reason="blocked_port_udp"}"#), metrics)
        }
    }

    /// Must-show 6: the same table with `mode: userspace` — blocked connections are closed
    /// at accept, before any byte reaches an upstream, and counted with the same reasons.
    func testUserspaceFallbackGivesTheSameVerdicts() throws {
        let namespace = try loopbackNamespace("userspace")
        try namespace.run {
            let scenario = try Scenario()
            let proxy = try L4LBProcess(config: scenario.config(mode: "userspace", pinPath: pinPath), waitFor: ("127.0.0.1", scenario.v4))
            defer { proxy.stop() }
            XCTAssertEqual(try proxy.stats().filter["mode"] as? String, "userspace")
            XCTAssertNil(try namespace.xdpProgramID("lo"))

            try checkVerdicts(scenario, proxy, blockedOutcome: .closedBeforeData)
            let stats = try proxy.stats()
            XCTAssertEqual(stats.filterCount("*", dropped: "blocked_source_v4"), 2)
            XCTAssertEqual(stats.filterCount("*", dropped: "blocked_source_v6"), 1)
            XCTAssertEqual(stats.filterCount("*", dropped: "blocked_port_tcp"), 1)
            XCTAssertEqual(stats.filterCount("*", passed: "allowed"), 1)

            // At scale: 200 connections at once from a blocked source are all closed at
            // accept; the upstream sees none.
            let acceptedBefore = scenario.backend.accepted
            var closed = 0
            for _ in 0..<200 where FilterTraffic.attempt(host: "127.0.0.1", port: scenario.v4, source: "127.0.0.2") == .closedBeforeData { closed += 1 }
            XCTAssertEqual(closed, 200)
            XCTAssertEqual(scenario.backend.accepted, acceptedBefore)
            XCTAssertEqual(try proxy.stats().filterCount("*", dropped: "blocked_source_v4"), 202)
            // Allowed traffic still flows.
            XCTAssertEqual(FilterTraffic.attempt(host: "127.0.0.1", port: scenario.v4, source: "127.0.0.1"), .served)
        }
    }

    /// `mode: auto` falls back to user space when XDP cannot attach (and says why);
    /// `mode: native` refuses to start instead.
    func testAutoFallsBackToUserspaceAndNativeFailsClearly() throws {
        let namespace = try loopbackNamespace("fallback")
        try namespace.run {
            let scenario = try Scenario()
            let proxy = try L4LBProcess(config: scenario.config(mode: "auto", pinPath: pinPath, interfaces: "[l4lb-absent0]"), waitFor: ("127.0.0.1", scenario.v4))
            let filter = try proxy.stats().filter
            XCTAssertEqual(filter["mode"] as? String, "userspace")
            XCTAssertTrue((filter["fallback_reason"] as? String ?? "").contains("l4lb-absent0"), "\(filter)")
            XCTAssertEqual(FilterTraffic.attempt(host: "127.0.0.1", port: scenario.v4, source: "127.0.0.2"), .closedBeforeData)
            XCTAssertEqual(FilterTraffic.attempt(host: "127.0.0.1", port: scenario.v4, source: "127.0.0.1"), .served)
            proxy.stop()

            let strict = try L4LBProcess(config: scenario.config(mode: "native", pinPath: pinPath), waitFor: nil)
            XCTAssertEqual(strict.waitForExit(timeout: 10), 1)
            XCTAssertTrue(strict.log.contains("filter.xdp.interfaces"), strict.log)
            XCTAssertTrue(strict.log.contains("native"), strict.log)
        }
    }

    // MARK: veth, native XDP, VLAN tags

    func vethPair(_ tag: String) throws -> (client: NetworkNamespace, server: NetworkNamespace) {
        try NetworkNamespace.vethPair(tag)
    }

    /// Must-show 2: a veth pair between a client namespace and l4lb's, native XDP on
    /// l4lb's end; IPv4 and IPv6 from documentation ranges, and VLAN-tagged frames
    /// (802.1Q, and 802.1ad + 802.1Q) sent raw through AF_PACKET.
    func testNativeXDPOnVethDropsBlockedSourcesOverIPv4IPv6AndVLANs() throws {
        let (client, server) = try vethPair("veth")

        let port: UInt16 = 18080
        let (proxy, backend) = try server.run { () throws -> (L4LBProcess, TestBackend) in
            let backend = try TestBackend(.echo)
            let proxy = try L4LBProcess(config: """
                workers: 2
                listeners:
                  - { name: v4, address: 192.0.2.2:\(port), cluster: echo }
                  - { name: v6, address: "[2001:db8::2]:\(port)", cluster: echo }
                clusters:
                  - name: echo
                    endpoints: [ { address: 127.0.0.1:\(backend.port) } ]
                filter:
                  xdp: { interfaces: [l4s], mode: native, pin_path: \(pinPath) }
                  block_sources: [192.0.2.1, "2001:db8::1"]
                """, waitFor: ("192.0.2.2", port))
            return (proxy, backend)
        }
        defer { proxy.stop() }
        func stats() throws -> [String: Any] { try server.run { try proxy.stats() } }
        let interfaces = try stats().filter["interfaces"] as? [[String: Any]]
        XCTAssertEqual(interfaces?.first?["mode"] as? String, "native")
        XCTAssertEqual(interfaces?.first?["name"] as? String, "l4s")

        let acceptedBefore = backend.accepted
        try client.run {
            // Allowed sources first (their neighbour discovery is not from a blocked address).
            XCTAssertEqual(FilterTraffic.attempt(host: "192.0.2.2", port: port, source: "192.0.2.3", timeout: 3), .served)
            XCTAssertEqual(FilterTraffic.attempt(host: "2001:db8::2", port: port, source: "2001:db8::3", timeout: 3), .served)
            XCTAssertEqual(FilterTraffic.connectMany(host: "192.0.2.2", port: port, source: "192.0.2.1", count: 50, timeout: 1.5), 0)
            XCTAssertEqual(FilterTraffic.connectMany(host: "2001:db8::2", port: port, source: "2001:db8::1", count: 50, timeout: 1.5), 0)
        }
        XCTAssertEqual(backend.accepted - acceptedBefore, 2)
        var before = try stats()
        XCTAssertGreaterThanOrEqual(before.filterCount("l4s", dropped: "blocked_source_v4"), 50)
        XCTAssertGreaterThanOrEqual(before.filterCount("l4s", dropped: "blocked_source_v6"), 50)

        // Tagged frames: the parser looks through one or two VLAN headers.
        let dot1q: [(tpid: UInt16, id: UInt16)] = [(0x8100, 100)]
        let qinq: [(tpid: UInt16, id: UInt16)] = [(0x88A8, 200), (0x8100, 100)]
        let cases: [(source: String, destination: String, tags: [(tpid: UInt16, id: UInt16)], counter: String, dropped: Bool)] = [
            ("192.0.2.1", "192.0.2.2", dot1q, "blocked_source_v4", true),
            ("192.0.2.1", "192.0.2.2", qinq, "blocked_source_v4", true),
            ("2001:db8::1", "2001:db8::2", dot1q, "blocked_source_v6", true),
            ("2001:db8::1", "2001:db8::2", qinq, "blocked_source_v6", true),
            ("192.0.2.3", "192.0.2.2", dot1q, "no_match", false),
            ("2001:db8::3", "2001:db8::2", qinq, "no_match", false),
            // Three tags is deeper than the parser follows: passed, counted as malformed.
            ("192.0.2.1", "192.0.2.2", qinq + dot1q, "malformed", false),
        ]
        for c in cases {
            let frame = FilterTraffic.udpFrame(source: c.source, destination: c.destination, port: 5353, tags: c.tags)
            try client.run { try FilterTraffic.sendFrames(Array(repeating: frame, count: 10), on: "l4c") }
            var after: [String: Any] = [:]
            let counted = waitUntil(timeout: 5) {
                after = (try? stats()) ?? [:]
                let delta = c.dropped
                    ? after.filterCount("l4s", dropped: c.counter) - before.filterCount("l4s", dropped: c.counter)
                    : after.filterCount("l4s", passed: c.counter) - before.filterCount("l4s", passed: c.counter)
                return delta >= 10
            }
            XCTAssertTrue(counted, "\(c.source) with \(c.tags.count) tag(s): \(c.counter) did not count 10")
            if c.dropped {
                // Exactly the ten frames: nothing else from a blocked source was in flight.
                XCTAssertEqual(after.filterCount("l4s", dropped: c.counter) - before.filterCount("l4s", dropped: c.counter), 10, "\(c.source) \(c.tags.count) tag(s)")
            } else {
                XCTAssertEqual(after.filterCount("l4s", dropped: "blocked_source_v4"), before.filterCount("l4s", dropped: "blocked_source_v4"))
                XCTAssertEqual(after.filterCount("l4s", dropped: "blocked_source_v6"), before.filterCount("l4s", dropped: "blocked_source_v6"))
            }
            before = after
        }
    }

    /// The parser follows IPv4 options, fragments and IPv6 extension headers to the ports,
    /// passes (and counts) what is truncated, and drops what hides its ports from a port
    /// rule. Raw frames over the veth, each kind
    /// ten times, and the exact counter that moved.
    func testParserFollowsOptionsFragmentsAndExtensionHeaders() throws {
        let (client, server) = try vethPair("parse")
        let port: UInt16 = 18081
        let proxy = try server.run {
            try L4LBProcess(config: """
                workers: 1
                listeners:
                  - { name: v4, address: 192.0.2.2:\(port), cluster: echo }
                clusters:
                  - name: echo
                    endpoints: [ { address: 127.0.0.1:9 } ]
                filter:
                  xdp: { interfaces: [l4s], pin_path: \(pinPath) }
                  block_sources: [192.0.2.1, "2001:db8::1"]
                  block_ports: [udp/5353]
                """, waitFor: nil)
        }
        defer { proxy.stop() }
        func stats() throws -> [String: Any] { try server.run { try proxy.stats() } }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? stats()) != nil }, proxy.log)
        let allowed4 = ("192.0.2.3", "192.0.2.2"), blocked4 = ("192.0.2.1", "192.0.2.2")
        let allowed6 = ("2001:db8::3", "2001:db8::2")
        typealias Case = (name: String, frame: [UInt8], dropped: Bool, counter: String)
        func frame(_ pair: (String, String), port: UInt16 = 5353, options: Int = 0, offset: UInt16 = 0, more: Bool = false,
                   extensions: [UInt8] = [], cut: Int? = nil) -> [UInt8] {
            FilterTraffic.udpFrame(source: pair.0, destination: pair.1, port: port, options: options, fragmentOffset: offset,
                                   moreFragments: more, extensions: extensions, truncatedTo: cut)
        }
        let cases: [Case] = [
            ("IPv4 with 2 option words to a blocked port", frame(allowed4, options: 2), true, "blocked_port_udp"),
            ("IPv4 with 10 option words (60-byte header)", frame(allowed4, options: 10), true, "blocked_port_udp"),
            ("IPv4 first fragment (ports present)", frame(allowed4, more: true), true, "blocked_port_udp"),
            ("IPv4 non-first fragment (no ports)", frame(allowed4, offset: 185), false, "fragment"),
            ("IPv4 non-first fragment from a blocked source", frame(blocked4, offset: 185), true, "blocked_source_v4"),
            ("IPv4 to another port", frame(allowed4, port: 5354), false, "no_match"),
            ("IPv6 behind hop-by-hop and destination options", frame(allowed6, extensions: [0, 60]), true, "blocked_port_udp"),
            ("IPv6 first fragment", frame(allowed6, more: true, extensions: [0]), true, "blocked_port_udp"),
            ("IPv6 non-first fragment", frame(allowed6, offset: 100), false, "fragment"),
            ("IPv6 with 6 extension headers (the most followed)", frame(allowed6, extensions: [0, 60, 60, 60, 60, 60]), true, "blocked_port_udp"),
            // Hidden ports while port rules exist: dropped, or headers could smuggle a
            // packet past a rule (the kernel would accept these).
            ("IPv6 with 7 extension headers", frame(allowed6, extensions: [0, 60, 60, 60, 60, 60, 60]), true, "unreachable_ports"),
            ("IPv4 first fragment cut before its ports", frame(allowed4, more: true, cut: 14 + 20 + 2), true, "unreachable_ports"),
            ("IPv6 first fragment cut before its ports", frame(allowed6, more: true, extensions: [0], cut: 14 + 40 + 8 + 8 + 2), true, "unreachable_ports"),
            ("IPv4 header cut short", frame(allowed4, cut: 14 + 12), false, "malformed"),
            ("IPv4 options cut short", frame(allowed4, options: 4, cut: 14 + 24), false, "malformed"),
            ("UDP header cut short", frame(allowed4, cut: 14 + 20 + 2), false, "malformed"),
            ("IPv6 header cut short", frame(allowed6, cut: 14 + 30), false, "malformed"),
        ]
        var before = try stats()
        for c in cases {
            try client.run { try FilterTraffic.sendFrames(Array(repeating: c.frame, count: 10), on: "l4c") }
            func delta(_ now: [String: Any]) -> Int {
                c.dropped ? now.filterCount("l4s", dropped: c.counter) - before.filterCount("l4s", dropped: c.counter)
                    : now.filterCount("l4s", passed: c.counter) - before.filterCount("l4s", passed: c.counter)
            }
            var after: [String: Any] = [:]
            XCTAssertTrue(waitUntil(timeout: 5) { after = (try? stats()) ?? [:]; return delta(after) >= 10 }, "\(c.name): \(c.counter) did not count 10")
            if c.dropped || c.counter != "no_match" {
                // Nothing else produces these verdicts on this link: exactly the ten frames.
                XCTAssertEqual(delta(after), 10, c.name)
            }
            before = after
        }
    }

    // MARK: Run-time changes, reload, restart

    /// One listener on `port` in front of `backend`, XDP on lo, `blocked` sources.
    func loopbackConfig(port: UInt16, backend: TestBackend, blocked: [String]) -> String {
        """
        workers: 2
        listeners:
          - { name: web, address: 127.0.0.1:\(port), cluster: echo }
        clusters:
          - name: echo
            endpoints: [ { address: 127.0.0.1:\(backend.port) } ]
        filter:
          xdp: { interfaces: [lo], pin_path: \(pinPath) }
          block_sources: [\(blocked.joined(separator: ", "))]
        """
    }

    /// Must-show 4: `l4lb block add/remove` and a reload change the verdicts for new
    /// packets at once, without a restart; connections from sources that stay allowed carry on.
    func testRuntimeChangesAndReloadTakeEffectWithoutDisturbingAllowedConnections() throws {
        let namespace = try loopbackNamespace("runtime")
        try namespace.run {
            let backend = try TestBackend(.echo)
            let port = Sockets.freePort()
            func config(_ blocked: [String]) -> String { loopbackConfig(port: port, backend: backend, blocked: blocked) }
            let proxy = try L4LBProcess(config: config(["127.0.0.9"]), waitFor: ("127.0.0.1", port))
            defer { proxy.stop() }
            // 50 established connections from a source that stays allowed throughout.
            let established = try (0..<50).map { _ in
                let fd = try Sockets.connect(host: "127.0.0.1", port: port, timeout: 3, bindTo: "127.0.0.1")
                Sockets.setTimeout(fd, seconds: 5)
                return fd
            }
            defer { established.forEach { close($0) } }
            func allStillEcho(_ round: Int) {
                for fd in established {
                    let message = Array("round \(round)\n".utf8)
                    XCTAssertNoThrow(try Sockets.sendAll(fd, message))
                    XCTAssertEqual(try? Sockets.receiveExactly(fd, message.count), message)
                }
            }
            allStillEcho(0)
            func attempt(_ source: String) -> FilterTraffic.Outcome { FilterTraffic.attempt(host: "127.0.0.1", port: port, source: source) }
            XCTAssertEqual(attempt("127.0.0.3"), .served)
            XCTAssertEqual(attempt("127.0.0.9"), .noConnection)

            var result = try proxy.runAdminCommand(["block", "add", "127.0.0.3"])
            XCTAssertEqual(result.status, 0, result.output)
            XCTAssertEqual(attempt("127.0.0.3"), .noConnection)
            allStillEcho(1)

            result = try proxy.runAdminCommand(["stats"])
            XCTAssertTrue(result.output.contains("filter: xdp on lo (generic), 2 blocked, 0 allowed"), result.output)
            XCTAssertNotNil(result.output.range(of: #"lo\s+generic\s+blocked_source_v4\s+[1-9]"#, options: .regularExpression), result.output)
            result = try proxy.runAdminCommand(["block", "list"])
            XCTAssertTrue(result.output.contains("127.0.0.3/32  blocked  runtime"), result.output)
            XCTAssertTrue(result.output.contains("127.0.0.9/32  blocked  config"), result.output)

            // A reload swaps the config's entries (127.0.0.9 out, 127.0.0.4 in) and keeps
            // the run-time one.
            try proxy.writeConfig(config(["127.0.0.4"]))
            let reload = try proxy.admin("POST", "/reload")
            XCTAssertEqual(reload.status, 200, reload.text)
            XCTAssertTrue(reload.text.contains("filter: 1 entries added, 1 removed"), reload.text)
            XCTAssertEqual(attempt("127.0.0.4"), .noConnection)
            XCTAssertEqual(attempt("127.0.0.9"), .served)
            XCTAssertEqual(attempt("127.0.0.3"), .noConnection)
            allStillEcho(2)

            result = try proxy.runAdminCommand(["block", "remove", "127.0.0.3"])
            XCTAssertEqual(result.status, 0, result.output)
            XCTAssertEqual(attempt("127.0.0.3"), .served)
            // A config entry cannot be removed at run time (it would return on reload).
            result = try proxy.runAdminCommand(["block", "remove", "127.0.0.4"])
            XCTAssertNotEqual(result.status, 0)
            XCTAssertTrue(result.output.contains("comes from the config file"), result.output)
            result = try proxy.runAdminCommand(["block", "add", "not-an-address"])
            XCTAssertNotEqual(result.status, 0)
            XCTAssertTrue(result.output.contains("not an IP address or CIDR prefix"), result.output)
            XCTAssertEqual(attempt("127.0.0.4"), .noConnection)
            allStillEcho(3)
            XCTAssertEqual(try proxy.stats().listener("web")?.int("active"), 50)
        }
    }

    /// Must-show 5: a clean restart keeps the pinned list (run-time entries included) and
    /// detaches on exit; after `kill -9` the filter stays in force, and the next start
    /// replaces the stale program.
    func testRestartKeepsThePinnedListAndKill9LeavesAProgramTheNextStartReplaces() throws {
        let namespace = try loopbackNamespace("restart")
        try namespace.run {
            let backend = try TestBackend(.echo)
            let port = Sockets.freePort()
            let config = loopbackConfig(port: port, backend: backend, blocked: ["127.0.0.9"])
            func attempt(_ source: String) -> FilterTraffic.Outcome { FilterTraffic.attempt(host: "127.0.0.1", port: port, source: source) }

            let first = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
            XCTAssertEqual(try first.runAdminCommand(["block", "add", "127.0.0.5"]).status, 0)
            XCTAssertEqual(attempt("127.0.0.5"), .noConnection)
            XCTAssertEqual(first.stopAndCollectLog().status, 0)
            XCTAssertNil(try namespace.xdpProgramID("lo"), "a clean exit detaches")
            XCTAssertTrue(FileManager.default.fileExists(atPath: "\(pinPath)/blocked_v4"), "the maps stay pinned")

            let second = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
            let list = try second.runAdminCommand(["block", "list"]).output
            XCTAssertTrue(list.contains("127.0.0.5/32  blocked  runtime"), list)
            XCTAssertTrue(list.contains("127.0.0.9/32  blocked  config"), list)
            XCTAssertEqual(attempt("127.0.0.5"), .noConnection)
            XCTAssertEqual(attempt("127.0.0.1"), .served)
            let secondProgram = try XCTUnwrap(try namespace.xdpProgramID("lo"))

            // kill -9: no chance to detach. The pinned link keeps the filter in force.
            second.process.signal(SIGKILL)
            XCTAssertEqual(second.waitForExit(timeout: 5), 128 + SIGKILL)
            second.stop()
            XCTAssertEqual(try namespace.xdpProgramID("lo"), secondProgram)
            XCTAssertEqual(attempt("127.0.0.5"), .noConnection, "still filtered with l4lb down")

            let third = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
            defer { third.stop() }
            XCTAssertNotNil(waitForLogLine(third, containing: ["replaced the program a previous run left attached"], timeout: 5), third.log)
            let thirdProgram = try XCTUnwrap(try namespace.xdpProgramID("lo"))
            XCTAssertNotEqual(thirdProgram, secondProgram)
            let reported = (try third.stats().filter["interfaces"] as? [[String: Any]])?.first?.int("program_id")
            XCTAssertEqual(reported, thirdProgram)
            XCTAssertEqual(attempt("127.0.0.5"), .noConnection)
            XCTAssertEqual(attempt("127.0.0.9"), .noConnection)
            XCTAssertEqual(attempt("127.0.0.1"), .served)
        }
    }

    // MARK: Scale

    /// 20,000 prefixes in the config, then a reload that replaces every one of them but
    /// 127.0.0.2: a source blocked before and after never gets a connection in while the
    /// diff is applied (there is no moment with an empty list), and allowed traffic is
    /// served throughout.
    func testReloadSwappingTwentyThousandEntriesNeverOpensTheList() throws {
        let namespace = try loopbackNamespace("scale")
        try namespace.run {
            let backend = try TestBackend(.echo)
            let port = Sockets.freePort()
            func prefixes(_ second: Int) -> [String] {
                // 10.second.x.y/32 and a /24 per 256: two prefix lengths in the trie.
                (0..<20_000).map { i in i % 256 == 255 ? "10.\(second).\(i / 256).0/24" : "10.\(second).\(i / 256).\(i % 256)" }
            }
            let proxy = try L4LBProcess(config: loopbackConfig(port: port, backend: backend, blocked: ["127.0.0.2"] + prefixes(1)),
                                        waitFor: ("127.0.0.1", port))
            defer { proxy.stop() }
            XCTAssertEqual(try proxy.stats().filter.int("blocked_entries"), 20_001)

            let stop = UncheckedBox(false)
            let probes = UncheckedBox((blockedGotIn: 0, blockedTries: 0, allowedServed: 0, allowedFailed: 0))
            let done = DispatchSemaphore(value: 0)
            let namespacePath = "/run/netns/\(namespace.name)"
            let probe = Thread {
                _ = CTest_enter_netns(namespacePath)
                while !stop.value {
                    probes.value.blockedTries += 1
                    probes.value.blockedGotIn += FilterTraffic.connectMany(host: "127.0.0.1", port: port, source: "127.0.0.2", count: 20, timeout: 0.05)
                    if FilterTraffic.attempt(host: "127.0.0.1", port: port, source: "127.0.0.1") == .served {
                        probes.value.allowedServed += 1
                    } else {
                        probes.value.allowedFailed += 1
                    }
                }
                done.signal()
            }
            probe.start()
            try proxy.writeConfig(loopbackConfig(port: port, backend: backend, blocked: prefixes(2) + ["127.0.0.2"]))
            let started = Date()
            let reload = try proxy.admin("POST", "/reload")
            let took = Date().timeIntervalSince(started)
            XCTAssertEqual(reload.status, 200, reload.text)
            XCTAssertTrue(reload.text.contains("filter: 20000 entries added, 20000 removed"), reload.text)
            Thread.sleep(forTimeInterval: 0.3)
            stop.value = true
            done.wait()
            print("reload swapping 20,000 filter entries: \(String(format: "%.2f", took)) s; probes: \(probes.value)")
            XCTAssertEqual(probes.value.blockedGotIn, 0, "a blocked source got in during the reload")
            XCTAssertGreaterThan(probes.value.blockedTries, 5)
            XCTAssertEqual(probes.value.allowedFailed, 0)
            XCTAssertGreaterThan(probes.value.allowedServed, 5)
            let stats = try proxy.stats()
            XCTAssertEqual(stats.filter.int("blocked_entries"), 20_001)
            // The new entries hold, the old ones are gone.
            let list = try proxy.runAdminCommand(["block", "list"]).output
            XCTAssertFalse(list.contains("10.1.0.1/32"))
            for entry in [#"10\.2\.0\.1/32"#, #"10\.2\.0\.0/24"#, #"127\.0\.0\.2/32"#] {
                XCTAssertNotNil(list.range(of: entry + #"\s+blocked\s+config"#, options: .regularExpression), "\(entry) in \(list.prefix(300))")
            }
        }
    }

    /// Must-show 6 for UDP: with `mode: userspace` the same lists hold at UDP receive —
    /// datagrams from a blocked source, or to a `udp/PORT` listener, never reach the
    /// backend and are counted with the XDP reasons; allowed clients are served.
    func testUserspaceFallbackFiltersUDPAtReceive() throws {
        let namespace = try loopbackNamespace("udp-userspace")
        try namespace.run {
            let backend = try UDPBackend(.echo)
            defer { backend.stop() }
            let open = Sockets.freePort(), closed = Sockets.freePort()
            let proxy = try L4LBProcess(config: """
                workers: 2
                listeners:
                  - { name: dns, address: 127.0.0.1:\(open), protocol: udp, cluster: udp }
                  - { name: closed, address: 127.0.0.1:\(closed), protocol: udp, cluster: udp }
                clusters:
                  - name: udp
                    endpoints: [ { address: "\(backend.address)" } ]
                filter:
                  xdp: { interfaces: [lo], mode: userspace, pin_path: \(pinPath) }
                  block_sources: [127.0.0.2, "2001:db8::6"]
                  block_ports: [udp/\(closed)]
                """, waitFor: nil)
            defer { proxy.stop() }
            XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, proxy.log)
            func served(from source: String, to port: UInt16, count: Int) throws -> Int {
                let fd = try UDPClient.connect(host: "127.0.0.1", port: port, source: source, timeout: 0.3)
                defer { close(fd) }
                for i in 0..<count {
                    let payload = Array("q\(i)".utf8)
                    _ = send(fd, payload, payload.count, 0)
                }
                // Every answer, until none has come for 0.3 s.
                var answers = 0
                var buffer = [UInt8](repeating: 0, count: 64)
                while recv(fd, &buffer, buffer.count, 0) > 0 { answers += 1 }
                return answers
            }
            XCTAssertEqual(try served(from: "127.0.0.1", to: open, count: 20), 20)
            let reachedBefore = backend.received
            XCTAssertEqual(try served(from: "127.0.0.2", to: open, count: 20), 0)
            XCTAssertEqual(try served(from: "127.0.0.1", to: closed, count: 10), 0)
            XCTAssertEqual(backend.received, reachedBefore, "a filtered datagram reached the backend")
            let stats = try proxy.stats()
            XCTAssertEqual(stats.filterCount("*", dropped: "blocked_source_v4"), 20)
            XCTAssertEqual(stats.filterCount("*", dropped: "blocked_port_udp"), 10)
            XCTAssertEqual(stats.listener("dns")?.int("active"), 1, "no session for the blocked source")
        }
    }
}
