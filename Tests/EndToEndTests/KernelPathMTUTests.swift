import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Path MTU through the kernel forwarder (issue 35, must-show 6): every interface is 1,500
/// bytes, but the way to the endpoints carries only 1,400. Behind l4lb a router says so
/// with ICMP, which must reach the client translated through the NAT; on l4lb's own route
/// the SYNs' MSS is clamped, so no ICMP is needed at all. Either way a bulk transfer each way
/// completes; without the translation the client's full-sized segments would vanish.
final class KernelPathMTUTests: XCTestCase {
    typealias Address = BottleneckTopology.Address
    static let size = 8 << 20

    func config(_ backends4: [TestBackend], _ backends6: [TestBackend]) -> String {
        func list(_ host: String, _ backends: [TestBackend]) -> String {
            backends.map { host.contains(":") ? "{ address: \"[\(host)]:\($0.port)\" }" : "{ address: \(host):\($0.port) }" }.joined(separator: ", ")
        }
        return """
            workers: 1
            drain_timeout: 1s
            kernel_relay: { interfaces: [l4b-c, l4b-r] }
            listeners:
              - { name: bulk4, address: \(Address.listener4):80, cluster: bulk4, relay: kernel }
              - { name: bulk6, address: "[\(Address.listener6)]:80", cluster: bulk6, relay: kernel }
            clusters:
              - { name: bulk4, balancer: maglev, endpoints: [\(list(Address.endpoint4, backends4))] }
              - { name: bulk6, balancer: maglev, endpoints: [\(list(Address.endpoint6, backends6))] }
            """
    }

    /// 8 MiB down, then 8 MiB up, per family, byte-exact; returns failures.
    func transfer(_ topology: BottleneckTopology, connections: Int) -> [String] {
        var failures: [String] = []
        for listener in [Address.listener4, Address.listener6] {
            for i in 0..<connections {
                do {
                    let fd = try topology.client.run { try Sockets.connect(host: listener, port: 80, timeout: 10) }
                    defer { close(fd) }
                    Sockets.setTimeout(fd, seconds: 20)
                    let download = try Sockets.receiveAll(fd)
                    var expected = PatternStream(seed: 11)
                    guard download.count == Self.size, download.withUnsafeBytes({ expected.matches($0) }) else {
                        throw Sockets.Failure("download of \(download.count) bytes, corrupted or short", 0)
                    }
                    var source = PatternStream(seed: 12)
                    var chunk = [UInt8](repeating: 0, count: Self.size)
                    chunk.withUnsafeMutableBytes { source.fill($0) }
                    try Sockets.sendAll(fd, chunk)
                    shutdown(fd, Int32(SHUT_WR))
                    guard Sockets.waitForClose(fd, timeout: 20) != nil else { throw Sockets.Failure("no close after both FINs", 0) }
                } catch {
                    failures.append("\(listener) #\(i): \(error)")
                }
            }
        }
        return failures
    }

    func run(_ topology: BottleneckTopology, connections: Int) throws -> [String: Any] {
        let backends4 = [try topology.endpoint.run { try TestBackend(.halfCloseFirst(bytes: Self.size, seed: 11), host: Address.endpoint4) }]
        let backends6 = [try topology.endpoint.run { try TestBackend(.halfCloseFirst(bytes: Self.size, seed: 11), host: Address.endpoint6) }]
        defer { (backends4 + backends6).forEach { $0.stop() } }
        let proxy = try topology.balancer.run { try L4LBProcess(config: config(backends4, backends6), waitFor: nil) }
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 30) { (try? topology.balancer.run { try proxy.stats() }) != nil }, "l4lb did not start: \(proxy.log)")
        XCTAssertEqual(transfer(topology, connections: connections), [])
        for (name, backends) in [("IPv4", backends4), ("IPv6", backends6)] {
            XCTAssertTrue(waitUntil(timeout: 20) { backends.map(\.sinkBytes).reduce(0, +) == connections * Self.size },
                          "\(name): the endpoint received \(backends.map(\.sinkBytes).reduce(0, +)) of \(connections * Self.size) bytes")
            XCTAssertFalse(backends.contains { $0.sinkMismatch }, "\(name): an upload arrived corrupted")
        }
        let stats = try topology.balancer.run { try proxy.stats() }
        for name in ["bulk4", "bulk6"] { XCTAssertEqual(stats.listener(name)?.int("total"), 0, "\(name): the kernel carried every connection") }
        return try XCTUnwrap(stats["kernel_relay"] as? [String: Any])
    }

    /// A router behind l4lb narrows the path: its ICMP "fragmentation needed" and "packet
    /// too big" about l4lb's NAT address reach the client as errors about its own
    /// connection, which lowers its segments, and the upload completes.
    func testICMPFromARouterBehindTheNATReachesTheClient() throws {
        let topology = try BottleneckTopology("kpm", mtu: 1400)
        let kernel = try run(topology, connections: 2)
        XCTAssertGreaterThan(kernel.int("icmp_translated"), 0, "\(kernel)")
        XCTAssertEqual(kernel.int("mss_clamped"), 0, "l4lb's own routes are 1,500 bytes: \(kernel)")
        XCTAssertEqual((kernel["drops"] as? [String: Any])?.int("mtu"), 0)
    }

    /// l4lb's own route toward the endpoints is the narrow one (their way back is not): the
    /// SYN-ACK's MSS, 1,460 from the endpoint's 1,500-byte link, is clamped to it, so the
    /// client's segments fit, and nothing is dropped. The SYN's stays: the endpoint's
    /// segments come back by a 1,500-byte route.
    func testTheMSSIsClampedToL4LBsOwnNarrowRoute() throws {
        let topology = try BottleneckTopology("kpc", mtu: 1500)
        try topology.balancer.ip(["route", "replace", "203.0.113.0/24", "via", "192.0.2.2", "mtu", "lock", "1400"])
        try topology.balancer.ip(["-6", "route", "replace", "2001:db8:2::/64", "via", "2001:db8:3::2", "mtu", "lock", "1400"])
        let kernel = try run(topology, connections: 2)
        XCTAssertGreaterThanOrEqual(kernel.int("mss_clamped"), 4, "each SYN-ACK (2 per family, and any retransmission) clamped: \(kernel)")
        XCTAssertEqual((kernel["drops"] as? [String: Any])?.int("mtu"), 0, "\(kernel)")
        XCTAssertEqual(kernel.int("icmp_translated"), 0)
    }
}
