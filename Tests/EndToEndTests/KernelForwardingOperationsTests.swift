import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Operations on kernel flows under load (issue 35, must-shows 4 and 5): an endpoint killed
/// while 200 kernel flows are open, an endpoint drained, a SYN flood from spoofed sources.
/// (The reloads under 200 flows are in `KernelForwardingTests`.)
final class KernelForwardingOperationsTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    func start(_ topology: RoutedTopology, _ backends: [TestBackend], listenerExtra: String = "") throws -> L4LBProcess {
        let endpoints = backends.map { "{ address: \(Address.endpoint4):\($0.port) }" }.joined(separator: ", ")
        let config = """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-e] }
            listeners:
              - { name: fast4, address: \(Address.listener4):80, cluster: web4, relay: kernel, idle_timeout: 120s\(listenerExtra) }
            clusters:
              - name: web4
                balancer: maglev
                hash_key: source_ip_port
                health_check: { type: tcp, interval: 200ms, timeout: 200ms, unhealthy_threshold: 2, healthy_threshold: 1 }
                endpoints: [\(endpoints)]
            """
        let proxy = try topology.balancer.run { try L4LBProcess(config: config, waitFor: nil) }
        XCTAssertTrue(waitUntil(timeout: 30) {
            let endpoints = ((try? topology.balancer.run { try proxy.stats() })?["clusters"] as? [[String: Any]])?.first?["endpoints"] as? [[String: Any]]
            return endpoints?.count == backends.count && endpoints?.allSatisfy { $0.bool("healthy") == true } == true
        }, "l4lb did not start with healthy endpoints: \(proxy.log)")
        return proxy
    }

    /// One 1 KiB echo on `fd`; false if it did not come back whole.
    static func echo(_ fd: Int32, _ seed: Int) -> Bool {
        let payload = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ seed) }
        guard (try? Sockets.sendAll(fd, payload)) != nil else { return false }
        return (try? Sockets.receiveExactly(fd, payload.count)) == payload
    }

    /// `count` kernel flows, each echoed once.
    static func open(_ topology: RoutedTopology, _ count: Int) throws -> [Int32] {
        try (0..<count).map { i in
            let fd = try topology.client.run { try Sockets.connect(host: Address.listener4, port: 80, timeout: 5) }
            Sockets.setTimeout(fd, seconds: 3)
            guard echo(fd, i) else { throw Sockets.Failure("flow #\(i) did not echo", 0) }
            return fd
        }
    }

    /// An endpoint killed under 200 open kernel flows: its health check takes it out within
    /// its fall time (2 × 200 ms, plus a timeout), the kernel's new flows avoid it from then
    /// on, and of the 200 open flows only those on the dead endpoint fail: every other one
    /// keeps echoing.
    func testAKilledEndpointLosesOnlyItsOwnFlowsAndNewFlowsAvoidIt() throws {
        let topology = try RoutedTopology("kfk")
        let backends = try (0..<3).map { _ in try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) } }
        defer { backends.forEach { $0.stop() } }
        let proxy = try start(topology, backends)
        defer { proxy.stop() }
        func stats() -> [String: Any]? { try? topology.balancer.run { try proxy.stats() } }

        let before = backends.map(\.dataConnections)
        let flows = try Self.open(topology, 200)
        defer { flows.forEach { close($0) } }
        let onDead = backends[0].dataConnections - before[0]
        XCTAssertGreaterThan(onDead, 0, "Maglev put some flows on each endpoint")

        let killed = Date()
        backends[0].stop()
        XCTAssertTrue(waitUntil(timeout: 5) { (stats()?["kernel_relay"] as? [String: Any])?.int("unavailable_endpoints") == 1 },
                      "the kernel's choice did not drop the dead endpoint")
        let outAfter = Date().timeIntervalSince(killed)
        XCTAssertLessThan(outAfter, 1.5, "out within the fall time (2 × 200 ms + 200 ms timeout), not \(outAfter) s")

        let survivors = flows.enumerated().filter { Self.echo($0.element, $0.offset) }.count
        XCTAssertEqual(survivors, 200 - onDead, "exactly the flows on the dead endpoint failed; every other one kept echoing")

        let dataBefore = backends.map(\.dataConnections)
        let fresh = try Self.open(topology, 100)
        fresh.forEach { close($0) }
        XCTAssertEqual(backends[1].dataConnections + backends[2].dataConnections - dataBefore[1] - dataBefore[2], 100,
                       "every new flow went to a live endpoint")
    }

    /// Drain: the drained endpoint's open kernel flows keep working, the kernel's new flows
    /// go to the others; undrained, it takes new flows again.
    func testADrainedEndpointKeepsItsKernelFlowsAndGetsNoNewOnes() throws {
        let topology = try RoutedTopology("kfd")
        let backends = try (0..<3).map { _ in try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) } }
        defer { backends.forEach { $0.stop() } }
        let proxy = try start(topology, backends)
        defer { proxy.stop() }

        let flows = try Self.open(topology, 200)
        defer { flows.forEach { close($0) } }
        let drain = "/clusters/web4/endpoints/\(Address.endpoint4):\(backends[1].port)/drain"
        XCTAssertEqual(try topology.balancer.run { try proxy.admin("POST", drain) }.status, 200)
        XCTAssertTrue(waitUntil(timeout: 2) {
            ((try? topology.balancer.run { try proxy.stats() })?["kernel_relay"] as? [String: Any])?.int("unavailable_endpoints") == 1
        }, "the kernel's choice did not drop the drained endpoint")

        let drainedBefore = backends[1].dataConnections
        let fresh = try Self.open(topology, 100)
        fresh.forEach { close($0) }
        XCTAssertEqual(backends[1].dataConnections, drainedBefore, "a new flow went to the drained endpoint")
        XCTAssertEqual(flows.enumerated().filter { Self.echo($0.element, $0.offset) }.count, 200, "every open flow kept working, the drained one's too")

        XCTAssertEqual(try topology.balancer.run { try proxy.admin("DELETE", drain) }.status, 200)
        XCTAssertTrue(waitUntil(timeout: 2) {
            ((try? topology.balancer.run { try proxy.stats() })?["kernel_relay"] as? [String: Any])?.int("unavailable_endpoints") == 0
        })
        let again = try Self.open(topology, 100)
        again.forEach { close($0) }
        XCTAssertGreaterThan(backends[1].dataConnections, drainedBefore, "undrained, it takes new flows again")
    }

    /// Must-show 5, the flood: 250,000 SYNs at about 50,000 a second from two spoofed
    /// client addresses (hping3, source ports counting up), none of which ever acknowledges
    /// the endpoint's SYN-ACK. Their half-open flows expire at the listener's 1 s
    /// connect_timeout, so the table never fills (beyond the NAT ports three endpoints
    /// have, the flood's SYNs go to the stack, whose SYN cookies answer them); the 200
    /// established flows keep echoing throughout, a fresh client connects in the middle of
    /// it, and afterwards the table holds only the real flows.
    func testASpoofedSYNFloodLeavesEstablishedFlowsAndNewClientsAlone() throws {
        let topology = try RoutedTopology("kfs")
        let backends = try (0..<3).map { _ in try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) } }
        defer { backends.forEach { $0.stop() } }
        let proxy = try start(topology, backends, listenerExtra: ", connect_timeout: 1s")
        defer { proxy.stop() }
        func kernel() -> [String: Any] { ((try? topology.balancer.run { try proxy.stats() })?["kernel_relay"] as? [String: Any]) ?? [:] }

        let flows = try Self.open(topology, 200)
        defer { flows.forEach { close($0) } }
        let flooders = try ["198.51.100.77", "198.51.100.78"].map { spoofed in
            try topology.client.run {
                try ChildProcess("/usr/sbin/hping3", ["-q", "-S", "-p", "80", "-a", spoofed, "-i", "u40", "-c", "125000", Address.listener4])
            }
        }
        defer { flooders.forEach { $0.terminate(); _ = $0.wait(timeout: 5) } }
        XCTAssertTrue(waitUntil(timeout: 10) { kernel().int("new_flows") > 10_000 }, "the flood did not reach the kernel: \(kernel())")

        // During the flood: every established flow echoes, round after round, and a new
        // client connects and echoes.
        var failures = 0, rounds = 0
        let fresh = try topology.client.run { try Sockets.connect(host: Address.listener4, port: 80, timeout: 5) }
        defer { close(fresh) }
        XCTAssertTrue(Self.echo(fresh, 7), "a new client during the flood")
        while flooders.contains(where: { $0.isRunning }), rounds < 100 {
            failures += flows.enumerated().filter { !Self.echo($0.element, $0.offset + rounds) }.count
            rounds += 1
        }
        XCTAssertEqual(failures, 0, "established flows failed an echo in \(rounds) rounds under the flood")
        XCTAssertGreaterThan(rounds, 1)

        // The half-open flows go within the connect timeout and a sweep.
        XCTAssertTrue(waitUntil(timeout: 25) { kernel().int("table_entries") <= 2 * 200 + 2 }, "the spoofed flows did not expire: \(kernel())")
        let after = kernel()
        // More half-open flows expired than the three endpoints have NAT ports (3 × 4,536):
        // ports came back during the flood as its flows expired. (How many more depends on
        // how often the sweeper may run: at most 5 % of a core.)
        XCTAssertGreaterThan((after["expired"] as? [String: Any])?.int("half_open") ?? 0, 3 * 4_536, "\(after)")
        XCTAssertEqual((after["expired"] as? [String: Any])?.int("idle"), 0, "\(after)")
        XCTAssertEqual((after["fallbacks"] as? [String: Any])?.int("table_full"), 0, "the table never filled: \(after)")
        XCTAssertTrue(Self.echo(fresh, 8))
        XCTAssertEqual(flows.enumerated().filter { !Self.echo($0.element, $0.offset) }.count, 0)
    }
}
