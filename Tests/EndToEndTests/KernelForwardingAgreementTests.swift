import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Agreement (issue 35, must-show 3): the kernel picks from the same tables user space
/// builds, so a client lands on the same endpoint through the kernel path, through a
/// proxied listener of the same cluster, and through a second l4lb instance whose config
/// lists the endpoints in another order; and weights hold over many flows.
final class KernelForwardingAgreementTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    /// `name`'s endpoints with weights 1, 2, 3, in `order`.
    static func cluster(_ name: String, _ backends: [TestBackend], order: [Int], hashKey: String) -> String {
        let endpoints = order.map { "{ address: \"[\(Address.endpoint6)]:\(backends[$0].port)\", weight: \($0 + 1) }" }.joined(separator: ", ")
        return "  - { name: \(name), balancer: maglev, hash_key: \(hashKey), endpoints: [\(endpoints)] }"
    }

    /// Connects from `source` (any port) to `port`, reads the endpoint's name and closes.
    static func identify(_ port: UInt16, from source: String) -> String? {
        guard let fd = try? Sockets.connect(host: Address.listener6, port: port, timeout: 5, bindTo: source) else { return nil }
        defer { close(fd) }
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 32, recv(fd, &byte, 1, 0) == 1, byte != UInt8(ascii: "\n") { line.append(byte) }
        return line.isEmpty ? nil : String(decoding: line, as: UTF8.self)
    }

    func testAClientLandsOnOneEndpointWhicheverPathOrInstanceCarriesIt() throws {
        let topology = try RoutedTopology("kag")
        let backends = try (0..<3).map { i in try topology.endpoint.run { try TestBackend(.identify("e\(i)"), host: Address.endpoint6) } }
        defer { backends.forEach { $0.stop() } }
        // 1,000 client addresses, added in one batch.
        let clients = (0..<1000).map { String(format: "2001:db8:1::a:%x", $0) }
        let batch = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-addresses-\(UUID().uuidString)")
        try clients.map { "addr add \($0)/64 dev l4c nodad" }.joined(separator: "\n").appending("\n").write(to: batch, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: batch) }
        try topology.client.ip(["-b", batch.path])

        let first = """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-e], nat_ports: 61000-62999 }
            listeners:
              - { name: kernel, address: "[\(Address.listener6)]:80", cluster: by_ip, relay: kernel }
              - { name: proxied, address: "[\(Address.listener6)]:81", cluster: by_ip }
              - { name: weights, address: "[\(Address.listener6)]:83", cluster: by_port, relay: kernel }
            clusters:
            \(Self.cluster("by_ip", backends, order: [0, 1, 2], hashKey: "source_ip"))
            \(Self.cluster("by_port", backends, order: [0, 1, 2], hashKey: "source_ip_port"))
            """
        // A second instance beside it: its own listener, NAT ports and tc programs on the
        // same interfaces (each leaves the other's packets to the next), endpoints reversed.
        let second = """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-e], nat_ports: 63000-65535 }
            listeners:
              - { name: kernel, address: "[\(Address.listener6)]:82", cluster: by_ip, relay: kernel }
            clusters:
            \(Self.cluster("by_ip", backends, order: [2, 1, 0], hashKey: "source_ip"))
            """
        let a = try topology.balancer.run { try L4LBProcess(config: first, waitFor: nil) }
        defer { a.stop() }
        let b = try topology.balancer.run { try L4LBProcess(config: second, waitFor: nil) }
        defer { b.stop() }
        for proxy in [a, b] {
            XCTAssertTrue(waitUntil(timeout: 30) { (try? topology.balancer.run { try proxy.stats() }) != nil }, "l4lb did not start: \(proxy.log)")
        }

        let results = try topology.client.run {
            clients.map { source in [80, 81, 82].map { Self.identify(UInt16($0), from: source) } }
        }
        let disagreements = zip(clients, results).filter { $0.1.contains(nil) || Set($0.1).count != 1 }
        XCTAssertEqual(disagreements.count, 0, "first few: \(disagreements.prefix(5).map { "\($0.0): kernel \($0.1[0] ?? "-"), proxied \($0.1[1] ?? "-"), second \($0.1[2] ?? "-")" })")
        let spread = Dictionary(grouping: results.compactMap { $0[0] }, by: { $0 }).mapValues(\.count)
        XCTAssertEqual(spread.count, 3, "1,000 addresses reached every endpoint: \(spread)")
        let statsA = try topology.balancer.run { try a.stats() }, statsB = try topology.balancer.run { try b.stats() }
        XCTAssertEqual(statsA.listener("kernel")?.int("total"), 0, "the kernel carried the first instance's kernel listener")
        XCTAssertEqual(statsB.listener("kernel")?.int("total"), 0, "and the second's: \(String(describing: statsB["kernel_relay"]))")
        XCTAssertEqual(statsA.listener("proxied")?.int("total"), 1000, "the proxied listener's went through the workers")

        // Weights 1:2:3 over 30,000 flows (source_ip_port: each flow hashed apart), the
        // kernel's and, where a burst ran an endpoint out of NAT ports, the workers'.
        let flowCount = 30_000
        let failures = try topology.client.run { (0..<flowCount).filter { Self.identify(83, from: clients[$0 % 50]) == nil }.count }
        XCTAssertEqual(failures, 0)
        let after = try topology.balancer.run { try a.stats() }
        let endpoints = (after["clusters"] as? [[String: Any]])?.first { $0["name"] as? String == "by_port" }?["endpoints"] as? [[String: Any]] ?? []
        let flows = endpoints.map { (($0["kernel_relay"] as? [String: Any])?.int("flows") ?? 0) + $0.int("total") }
        XCTAssertEqual(flows.reduce(0, +), flowCount, "\(flows)")
        XCTAssertGreaterThan(after.listener("weights").map { ($0["kernel_relay"] as? [String: Any])?.int("flows") ?? 0 } ?? 0, flowCount / 2,
                             "the kernel took most of them: \(String(describing: after["kernel_relay"]))")
        for (i, count) in flows.enumerated() {
            let expected = Double(flowCount) * Double(i + 1) / 6
            XCTAssertLessThan(abs(Double(count) / expected - 1), 0.05, "endpoint e\(i) (weight \(i + 1)) took \(count) of \(flowCount) flows, expected about \(Int(expected))")
        }
    }
}
