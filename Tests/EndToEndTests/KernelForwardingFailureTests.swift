import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Endpoints that fail kernel flows (issue 35): passive failures — a RST, an ICMP error or
/// silence answering the kernel's SYN — feed outlier detection as the proxy's failed
/// connects do, and `on_unhealthy: close` removes an unhealthy endpoint's kernel flows.
final class KernelForwardingFailureTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    /// Three broken endpoints beside two echoes: one port nothing listens on (the endpoint
    /// answers the SYN with a RST), one nftables rejects with ICMP port unreachable, one it
    /// drops (no answer within the listener's 500 ms connect_timeout). No health check:
    /// only outlier detection (3 consecutive failures) can take them out, and it does, from
    /// the kernel's counts alone — the workers accept no connection. Then every new flow
    /// reaches an echo.
    func testRSTsICMPErrorsAndSilenceAnsweringKernelSYNsEjectTheEndpoint() throws {
        let topology = try RoutedTopology("kfo")
        let echoes = try (0..<2).map { _ in try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) } }
        defer { echoes.forEach { $0.stop() } }
        let (refusing, rejecting, silent) = (Sockets.freePort(), Sockets.freePort(), Sockets.freePort())
        let rules = """
            table inet l4lb_test {
              chain input {
                type filter hook input priority 0;
                tcp dport \(rejecting) reject with icmp type port-unreachable
                tcp dport \(silent) drop
              }
            }
            """
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-nft-\(UUID().uuidString)").path
        try rules.write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let nft = try ChildProcess.run("/usr/sbin/ip", ["netns", "exec", topology.endpoint.name, "nft", "-f", file])
        XCTAssertEqual(nft.status, 0, nft.output)

        let ports = echoes.map(\.port) + [refusing, rejecting, silent]
        let endpoints = ports.map { "{ address: \(Address.endpoint4):\($0) }" }.joined(separator: ", ")
        let config = """
            workers: 1
            kernel_relay: { interfaces: [l4b-c, l4b-e] }
            listeners:
              - { name: fast4, address: \(Address.listener4):80, cluster: web4, relay: kernel, connect_timeout: 500ms }
            clusters:
              - name: web4
                balancer: maglev
                hash_key: source_ip_port
                outlier_detection: { consecutive_failures: 3, ejection_time: 60s, max_ejection_percent: 60 }
                endpoints: [\(endpoints)]
            """
        let proxy = try topology.balancer.run { try L4LBProcess(config: config, waitFor: nil) }
        defer { proxy.stop() }
        func stats() -> [String: Any] { (try? topology.balancer.run { try proxy.stats() }) ?? [:] }
        func endpoint(_ port: UInt16) -> [String: Any] { stats().endpoint(cluster: "web4", address: "\(Address.endpoint4):\(port)") ?? [:] }
        func kernel(_ port: UInt16) -> [String: Any] { endpoint(port)["kernel_relay"] as? [String: Any] ?? [:] }
        XCTAssertTrue(waitUntil(timeout: 30) { !stats().isEmpty }, "l4lb did not start: \(proxy.log)")

        // Connections one after another until all three are out: each broken endpoint fails
        // its share, the echoes serve theirs.
        var failed = 0, attempts = 0
        let broken = [refusing, rejecting, silent]
        while attempts < 400, !broken.allSatisfy({ endpoint($0).bool("ejected") == true }) {
            attempts += 1
            let fd = try? topology.client.run { try Sockets.connect(host: Address.listener4, port: 80, timeout: 3) }
            guard let fd else { failed += 1; continue }
            Sockets.setTimeout(fd, seconds: 3)
            if !KernelForwardingOperationsTests.echo(fd, attempts) { failed += 1 }
            close(fd)
        }
        for port in broken {
            XCTAssertEqual(endpoint(port).bool("ejected"), true, "endpoint \(port) was not ejected after \(attempts) connects: \(endpoint(port))")
            XCTAssertGreaterThanOrEqual(kernel(port).int("connect_failures"), 3, "\(port): \(kernel(port))")
            XCTAssertEqual(kernel(port).int("connect_successes"), 0, "\(port): \(kernel(port))")
        }
        XCTAssertGreaterThan(failed, 0)
        XCTAssertGreaterThanOrEqual((stats()["kernel_relay"] as? [String: Any])?.int("icmp_translated") ?? 0, 3, "the rejections reached the clients")
        XCTAssertEqual(stats().listener("fast4")?.int("total"), 0, "the workers accepted a connection")
        let listener = stats().listener("fast4")?["kernel_relay"] as? [String: Any] ?? [:]
        XCTAssertEqual(listener.int("connect_failures"), broken.map { kernel($0).int("connect_failures") }.reduce(0, +), "\(listener)")
        XCTAssertEqual(listener.int("connect_successes"), echoes.map { kernel($0.port).int("connect_successes") }.reduce(0, +), "\(listener)")

        // Out of the kernel's choice: 100 new flows, every one echoed, none on the broken.
        XCTAssertTrue(waitUntil(timeout: 2) { (stats()["kernel_relay"] as? [String: Any])?.int("unavailable_endpoints") == 3 })
        let flowsBefore = broken.map { kernel($0).int("flows") }
        for i in 0..<100 {
            let fd = try topology.client.run { try Sockets.connect(host: Address.listener4, port: 80, timeout: 3) }
            Sockets.setTimeout(fd, seconds: 3)
            XCTAssertTrue(KernelForwardingOperationsTests.echo(fd, i), "flow \(i) after the ejections")
            close(fd)
        }
        XCTAssertEqual(broken.map { kernel($0).int("flows") }, flowsBefore, "a new flow went to an ejected endpoint")
    }

    /// `on_unhealthy: close`: when an endpoint's health check fails, its kernel flows are
    /// removed — each of its clients' next segment meets a reset — and every flow to the
    /// healthy endpoint carries on; the listener counts them (`closed_unhealthy`).
    func testOnUnhealthyCloseEndsTheUnhealthyEndpointsKernelFlows() throws {
        let topology = try RoutedTopology("kfu")
        let failing = try topology.endpoint.run { try ClosableEchoBackend(host: Address.endpoint4) }
        defer { failing.stop() }
        let healthy = try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) }
        defer { healthy.stop() }
        let config = """
            workers: 1
            kernel_relay: { interfaces: [l4b-c, l4b-e] }
            listeners:
              - { name: fast4, address: \(Address.listener4):80, cluster: web4, relay: kernel, idle_timeout: 120s }
            clusters:
              - name: web4
                balancer: maglev
                hash_key: source_ip_port
                health_check: { type: tcp, interval: 200ms, timeout: 200ms, unhealthy_threshold: 2, healthy_threshold: 1 }
                on_unhealthy: close
                endpoints: [{ address: \(failing.address) }, { address: \(Address.endpoint4):\(healthy.port) }]
            """
        let proxy = try topology.balancer.run { try L4LBProcess(config: config, waitFor: nil) }
        defer { proxy.stop() }
        func stats() -> [String: Any] { (try? topology.balancer.run { try proxy.stats() }) ?? [:] }
        XCTAssertTrue(waitUntil(timeout: 30) {
            (stats()["clusters"] as? [[String: Any]])?.first?["endpoints"].flatMap { $0 as? [[String: Any]] }?.allSatisfy { $0.bool("healthy") == true } == true
        }, "l4lb did not start with healthy endpoints: \(proxy.log)")

        let flows = try KernelForwardingOperationsTests.open(topology, 100)
        defer { flows.forEach { close($0) } }
        // Every flow echoed once, so the healthy endpoint has counted all of its own.
        let onFailing = 100 - healthy.dataConnections
        XCTAssertGreaterThan(onFailing, 0, "Maglev put flows on both endpoints")

        failing.closeListener()
        XCTAssertTrue(waitUntil(timeout: 5) { stats().endpoint(cluster: "web4", address: failing.address)?.bool("healthy") == false })
        let kernel = { stats().listener("fast4")?["kernel_relay"] as? [String: Any] ?? [:] }
        XCTAssertTrue(waitUntil(timeout: 2) { kernel().int("closed_unhealthy") == onFailing }, "\(kernel())")
        let echoed = flows.enumerated().map { KernelForwardingOperationsTests.echo($0.element, $0.offset) }
        XCTAssertEqual(echoed.filter { !$0 }.count, onFailing, "exactly the unhealthy endpoint's flows ended")
        XCTAssertEqual(echoed.filter { $0 }.count, 100 - onFailing, "the healthy endpoint's flows carry on")
    }
}
