import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Must-show 5 at scale (issue 35): 100,000 concurrent kernel flows with a table sized for
/// them. Kernel flows hold no l4lb descriptor, but the test's own clients and servers hold
/// one per connection each side, and this machine allows 20,000 per process, so six client
/// processes (each from its own address) and eight echo servers (one per endpoint) share
/// them (`Support/many_flows.py`).
final class KernelForwardingScaleTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("Support/many_flows.py").path

    /// A `many_flows.py` process in `namespace`, its JSON lines read from a file.
    final class FlowProcess {
        let child: ChildProcess
        let output: String

        init(_ namespace: NetworkNamespace, _ arguments: [String]) throws {
            output = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-flows-\(UUID().uuidString)").path
            child = try ChildProcess("/usr/sbin/ip", ["netns", "exec", namespace.name, "/usr/bin/python3", KernelForwardingScaleTests.script] + arguments,
                                     stdout: output, stderr: output)
        }

        func stop() {
            child.terminate()
            _ = child.wait(timeout: 10)
            try? FileManager.default.removeItem(atPath: output)
        }

        /// The JSON lines printed so far.
        var lines: [[String: Any]] {
            let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        }

        var log: String { (try? String(contentsOfFile: output, encoding: .utf8)) ?? "" }
    }

    /// 100,000 connections from six client addresses to one kernel listener over eight
    /// endpoints, all open at once and each echoed twice: the workers accept none of them,
    /// l4lb holds no descriptor for them, the endpoints see every one coming from l4lb's NAT
    /// address, and the table holds exactly their 200,000 entries. Then, silent, none expires
    /// before the listener's `idle_timeout` and all are gone within a sweep after it, the
    /// table back to empty.
    func testAHundredThousandConcurrentFlowsExpireAndEmptyTheTable() throws {
        let topology = try RoutedTopology("kfh")
        let flows = 100_000, clients = 6, idle: TimeInterval = 60
        let ports = (0..<8).map { 7001 + $0 }
        let servers = try ports.map { port in
            try FlowProcess(topology.endpoint, ["serve", "--host", Address.endpoint4, "--port", "\(port)"])
        }
        defer { servers.forEach { $0.stop() } }
        XCTAssertTrue(waitUntil(timeout: 20) { servers.allSatisfy { !$0.lines.isEmpty } }, servers.map(\.log).joined())

        let endpoints = ports.map { "{ address: \(Address.endpoint4):\($0) }" }.joined(separator: ", ")
        let config = """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-e], nat_ports: 1024-32767, flows: 131072 }
            listeners:
              - { name: fast4, address: \(Address.listener4):80, cluster: web4, relay: kernel, idle_timeout: \(Int(idle))s }
            clusters:
              - { name: web4, balancer: maglev, hash_key: source_ip_port, endpoints: [\(endpoints)] }
            """
        let proxy = try topology.balancer.run { try L4LBProcess(config: config, waitFor: nil) }
        defer { proxy.stop() }
        func stats() -> [String: Any] { (try? topology.balancer.run { try proxy.stats() }) ?? [:] }
        func kernel() -> [String: Any] { stats()["kernel_relay"] as? [String: Any] ?? [:] }
        XCTAssertTrue(waitUntil(timeout: 30) { !stats().isEmpty }, "l4lb did not start: \(proxy.log)")

        try topology.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        let openers = try (0..<clients).map { i in
            let source = "198.51.100.\(20 + i)"
            try topology.client.ip(["addr", "add", "\(source)/24", "dev", "l4c"])
            let count = flows / clients + (i < flows % clients ? 1 : 0)
            return try FlowProcess(topology.client, ["open", "--source", source, "--host", Address.listener4, "--port", "80", "--count", "\(count)"])
        }
        defer { openers.forEach { $0.stop() } }
        XCTAssertTrue(waitUntil(timeout: 240) { openers.allSatisfy { !$0.lines.isEmpty } }, "the clients did not finish opening")
        let opened = openers.map { $0.lines.first ?? [:] }
        XCTAssertEqual(opened.map { $0.int("opened") }.reduce(0, +), flows, "\(opened)")

        // All open at once: the kernel carries every one, l4lb holds nothing for them (the
        // table's occupancy is as of the last sweep).
        XCTAssertTrue(waitUntil(timeout: 30) { kernel().int("table_entries") == 2 * flows }, "\(kernel())")
        var table = kernel()
        XCTAssertEqual(table.int("new_flows"), flows, "\(table)")
        XCTAssertEqual((table["fallbacks"] as? [String: Any])?.values.compactMap { $0 as? Int }.reduce(0, +), 0, "\(table)")
        XCTAssertEqual(stats().listener("fast4")?.int("total"), 0, "the workers accepted a connection")
        XCTAssertLessThan(proxy.resources.descriptors, 200, "l4lb holds descriptors for kernel flows")
        let established = try ChildProcess.run("/usr/sbin/ip", ["netns", "exec", topology.endpoint.name, "ss", "-Htn", "state", "established"])
        let peers = established.output.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
        XCTAssertEqual(peers.filter { $0.count >= 4 && $0[3].hasPrefix("\(Address.nat4):") }.count, flows,
                       "the endpoints do not see every flow from l4lb's NAT address")

        // A second echo on every flow, all still open together.
        let touched = Date()
        openers.forEach { $0.child.signal(SIGUSR1) }
        XCTAssertTrue(waitUntil(timeout: 120) { openers.allSatisfy { $0.lines.count >= 2 } }, "the second round did not finish")
        let echoed = openers.map { $0.lines.count >= 2 ? $0.lines[1] : [:] }
        XCTAssertEqual(echoed.map { $0.int("echoed") }.reduce(0, +), flows, "\(echoed)")
        let lastTouched = Date()

        // Silent from here: nothing expires before idle_timeout, everything within a sweep
        // (a quarter of it) after.
        let early = touched.addingTimeInterval(idle - 2)
        while Date() < early {
            table = kernel()
            XCTAssertEqual(table.int("table_entries"), 2 * flows, "flows expired before idle_timeout: \(table)")
            if table.int("table_entries") != 2 * flows { break }
            Thread.sleep(forTimeInterval: min(5, max(0, early.timeIntervalSinceNow)))
        }
        XCTAssertTrue(waitUntil(timeout: lastTouched.addingTimeInterval(idle + idle / 4 + 10).timeIntervalSinceNow) {
            kernel().int("table_entries") == 0
        }, "the table did not empty: \(kernel())")
        table = kernel()
        XCTAssertEqual((table["expired"] as? [String: Any])?.int("idle"), flows, "\(table)")
        XCTAssertEqual(stats().listener("fast4")?.kernelRelay?.int("flows_active"), 0)
    }
}

private extension Dictionary where Key == String, Value == Any {
    var kernelRelay: [String: Any]? { self["kernel_relay"] as? [String: Any] }
}
