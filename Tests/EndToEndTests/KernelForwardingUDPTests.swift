import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// `relay: kernel` on udp listeners away from loopback, end to end through `l4lb run`
/// (issue 35): a session's first datagram reaches a worker, which picks its endpoint and
/// installs the session's two flows in the kernel forwarder's table with its session
/// socket as the NAT port; the kernel then carries its datagrams both ways. What one
/// packet cannot hold (fragments, reassembled by the stack) reaches the worker's sockets,
/// which relay it.
final class KernelForwardingUDPTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    /// A udp listener per family that has endpoints (`name` 4 and 6, on `port`), each to
    /// a cluster of them; `extra` adds more, as (listeners, clusters) lines.
    static func config(endpoints4: [UDPBackend], endpoints6: [UDPBackend] = [], port: UInt16 = 53, name: String = "dns",
                       extra: (listeners: [String], clusters: [String]) = ([], [])) -> String {
        func list(_ backends: [UDPBackend]) -> String { backends.map { "{ address: \"\($0.address)\" }" }.joined(separator: ", ") }
        let sides = [("4", "\(Address.listener4):\(port)", endpoints4), ("6", "\"[\(Address.listener6)]:\(port)\"", endpoints6)]
        var listeners: [String] = extra.listeners, clusters: [String] = extra.clusters
        for (family, address, backends) in sides where !backends.isEmpty {
            listeners.append("  - { name: \(name)\(family), address: \(address), protocol: udp, cluster: \(name)\(family), relay: kernel, idle_timeout: 3s }")
            clusters.append("  - { name: \(name)\(family), balancer: maglev, hash_key: source_ip_port, endpoints: [\(list(backends))] }")
        }
        return """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-e], flows: 4096 }
            listeners:
            \(listeners.joined(separator: "\n"))
            clusters:
            \(clusters.joined(separator: "\n"))
            """
    }

    /// Must-show 1 and 2 (UDP): 50 clients per family send datagrams of 1, 512 and the
    /// largest one packet holds (1,472 bytes over IPv4, 1,452 over IPv6), which the kernel
    /// carries both ways after the first, then 9,000 and 65,507 bytes, which arrive as
    /// fragments and are relayed by the worker, and last a small query whose endpoint
    /// answers with 9,000 bytes (fragments toward l4lb: they must reach the session's
    /// socket). Every reply comes back byte-identical; the kernel's counts, folded into the
    /// listener's, are exactly what the clients sent; the sessions end after their idle
    /// timeout and take their flows with them.
    func testUDPDatagramsAreCarriedByTheKernelAndFragmentsByTheWorkers() throws {
        let topology = try RoutedTopology("kfu")
        let backends4 = try (0..<3).map { _ in try topology.endpoint.run { try UDPBackend(.echo, host: Address.endpoint4) } }
        let backends6 = try (0..<3).map { _ in try topology.endpoint.run { try UDPBackend(.echo, host: Address.endpoint6) } }
        let large4 = try topology.endpoint.run { try UDPBackend(.grow(9000), host: Address.endpoint4) }
        let large6 = try topology.endpoint.run { try UDPBackend(.grow(9000), host: Address.endpoint6) }
        defer { (backends4 + backends6 + [large4, large6]).forEach { $0.stop() } }
        // Listeners big4 and big6 on port 54, each to its one large-answer endpoint.
        let large = Self.config(endpoints4: [large4], endpoints6: [large6], port: 54, name: "big").split(separator: "\n")
        let withLarge = Self.config(endpoints4: backends4, endpoints6: backends6, extra: (
            large.filter { $0.contains("name: big") && $0.contains("address: ") && $0.contains("protocol") }.map(String.init),
            large.filter { $0.contains("name: big") && $0.contains("endpoints:") }.map(String.init)))
        let proxy = try topology.balancer.run { try L4LBProcess(config: withLarge, waitFor: nil) }
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 30) { (try? topology.balancer.run { try proxy.stats() }) != nil }, "l4lb did not start: \(proxy.log)")

        let clients = 50
        let kernelSizes = [(Address.listener4, [1, 512, 1472]), (Address.listener6, [1, 512, 1452])]
        let fragmented = [9000, 65_507]
        var generator = SystemRandomNumberGenerator()
        var failures: [String] = []
        // Every client socket stays open to the end: a port reused while an earlier
        // client's session is still alive would be that session (the same 5-tuple).
        var open: [Int32] = []
        defer { open.forEach { close($0) } }
        for (listener, sizes) in kernelSizes {
            for client in 0..<clients {
                let fd = try topology.client.run { try UDPClient.connect(host: listener, port: 53, timeout: 5) }
                open.append(fd)
                for size in sizes + fragmented {
                    let payload = (0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }
                    let echo = UDPClient.exchange(fd, payload)
                    if echo != payload { failures.append("\(listener) client \(client), \(size) bytes: \(echo.map { "\($0.count) bytes back, different" } ?? "no reply")") }
                }
                let query = try topology.client.run { try UDPClient.connect(host: listener, port: 54, timeout: 5) }
                open.append(query)
                for round in 0..<2 {
                    let reply = UDPClient.exchange(query, [UInt8(round), 1, 2, 3])
                    if reply != UDPBackend.grown([UInt8(round), 1, 2, 3], to: 9000) {
                        failures.append("\(listener) client \(client), 9,000-byte answer #\(round): \(reply.map { "\($0.count) bytes" } ?? "no reply")")
                    }
                }
            }
        }
        XCTAssertEqual(failures, [])

        // The kernel's counts are folded into the listener's once a second.
        let sent = clients * (3 + fragmented.count)
        var stats: [String: Any] = [:]
        XCTAssertTrue(waitUntil(timeout: 10) {
            stats = (try? topology.balancer.run { try proxy.stats() }) ?? [:]
            return ["dns4", "dns6"].allSatisfy { stats.listener($0)?.int("datagrams_in") == sent && stats.listener($0)?.int("datagrams_out") == sent }
        }, "datagrams in and out per listener: \(["dns4", "dns6"].map { (stats.listener($0)?.int("datagrams_in"), stats.listener($0)?.int("datagrams_out")) }), expected \(sent)")
        for name in ["dns4", "dns6"] {
            let listener = try XCTUnwrap(stats.listener(name))
            XCTAssertEqual(listener.int("total"), clients, "\(name): one session per client")
            let kernel = try XCTUnwrap(listener["kernel_relay"] as? [String: Any], name)
            XCTAssertEqual(kernel.int("sessions"), clients, "\(name): every session went to the kernel")
            XCTAssertEqual(kernel.int("datagrams_in"), clients * 2, "\(name): the kernel carried every one-packet datagram after the first")
            XCTAssertEqual(kernel.int("datagrams_out"), clients * 3, "\(name): and every one-packet reply")
            XCTAssertEqual(kernel.int("fallbacks"), 0, name)
        }
        let kernel = try XCTUnwrap(stats["kernel_relay"] as? [String: Any], "\(stats)")
        // dns: 2 datagrams and 3 replies a client; big: the second query (its answer is
        // fragments, which the stack reassembles for the session's socket).
        XCTAssertEqual(kernel.int("forwarded_packets"), 2 * clients * (5 + 1), "exactly what the kernel carried, both ways")
        for (reason, count) in (kernel["drops"] as? [String: Any]) ?? [:] { XCTAssertEqual((count as? NSNumber)?.intValue, 0, "drop \(reason)") }
        for (name, backends) in [("IPv4", backends4), ("IPv6", backends6)] {
            XCTAssertEqual(backends.map(\.received).reduce(0, +), sent, name)
            XCTAssertTrue(backends.allSatisfy { $0.received > 0 }, "\(name): Maglev spread the clients over all three endpoints: \(backends.map(\.received))")
        }

        // Each session ends once idle for its listener's 3 s, and its flows go with it.
        XCTAssertTrue(waitUntil(timeout: 20) {
            let stats = (try? topology.balancer.run { try proxy.stats() }) ?? [:]
            return ["dns4", "dns6", "big4", "big6"].allSatisfy { stats.listener($0)?.int("active") == 0 }
                && (stats["kernel_relay"] as? [String: Any])?.int("table_entries") == 0
        }, "the idle sessions did not end with their flows: \(String(describing: (try? topology.balancer.run { try proxy.stats() })?["kernel_relay"]))")
    }

    /// A session keeps its endpoint whichever path carries its datagram: a small one (the
    /// kernel) and a large one (fragments, relayed by the worker) from one client reach
    /// one endpoint.
    func testTheKernelAndTheProxyPickTheSameEndpointForAClient() throws {
        let topology = try RoutedTopology("kfa")
        let backends = try (0..<4).map { i in try topology.endpoint.run { try UDPBackend(.tag("e\(i)"), host: Address.endpoint4) } }
        defer { backends.forEach { $0.stop() } }
        let proxy = try topology.balancer.run { try L4LBProcess(config: Self.config(endpoints4: backends), waitFor: nil) }
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 30) { (try? topology.balancer.run { try proxy.stats() }) != nil }, "l4lb did not start: \(proxy.log)")

        var disagreements: [String] = []
        var seen = Set<String>()
        var open: [Int32] = []
        defer { open.forEach { close($0) } }
        for client in 0..<100 {
            let fd = try topology.client.run { try UDPClient.connect(host: Address.listener4, port: 53, timeout: 5) }
            open.append(fd)
            func tag(_ size: Int) -> String? {
                UDPClient.exchange(fd, [UInt8](repeating: 7, count: size)).flatMap { reply in
                    reply.firstIndex(of: UInt8(ascii: ":")).map { String(decoding: reply[..<$0], as: UTF8.self) }
                }
            }
            let kernel = tag(100), proxied = tag(4000)
            if kernel == nil || kernel != proxied { disagreements.append("client \(client): kernel \(kernel ?? "-"), proxy \(proxied ?? "-")") }
            if let kernel { seen.insert(kernel) }
        }
        XCTAssertEqual(disagreements, [])
        XCTAssertEqual(seen.count, 4, "100 clients reached every endpoint: \(seen)")
        let stats = try topology.balancer.run { try proxy.stats() }
        XCTAssertEqual(stats.listener("dns4")?.int("total"), 100)
    }
}
