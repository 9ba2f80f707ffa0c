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
}
