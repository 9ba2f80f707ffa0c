import BPFSteer
import Foundation
import L4Balancer
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The kernel forwarder's path through a real routed topology (issue 35, step 3): the
/// program on tcx ingress of l4lb's two interfaces, flows installed by hand (choosing an
/// endpoint in the kernel is a later step), real TCP and UDP between a client namespace
/// and an endpoint namespace. Nothing in l4lb's namespace listens: a segment the program
/// failed to carry would meet a reset there, and the endpoint has no route to the client,
/// so a packet that escaped the NAT would go nowhere.
final class KernelForwardingPathTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    struct Family {
        var client: String, listener: String, nat: String, endpoint: String
        /// The largest UDP payload in one 1,500-byte packet.
        var largestDatagram: Int
    }

    static let families = [
        Family(client: Address.client4, listener: Address.listener4, nat: Address.nat4, endpoint: Address.endpoint4, largestDatagram: 1472),
        Family(client: Address.client6, listener: Address.listener6, nat: Address.nat6, endpoint: Address.endpoint6, largestDatagram: 1452),
    ]

    static func bytes(_ text: String) -> [UInt8] {
        if text.contains(":") {
            var address = in6_addr()
            precondition(inet_pton(AF_INET6, text, &address) == 1)
            return withUnsafeBytes(of: address) { Array($0) }
        }
        var address = in_addr()
        precondition(inet_pton(AF_INET, text, &address) == 1)
        return withUnsafeBytes(of: address) { Array($0) }
    }

    /// A forwarder on tcx ingress of both of l4lb's interfaces.
    func attachedRelay(_ topology: RoutedTopology, capacity: Int) throws -> KernelRelay {
        try topology.balancer.run { () throws -> KernelRelay in
            let relay = try KernelRelay(capacity: capacity)
            try relay.attach(to: "l4b-c")
            try relay.attach(to: "l4b-e")
            return relay
        }
    }

    /// Installs both directions of one flow: client:clientPort → listener:listenerPort
    /// becomes nat:natPort → endpoint:endpointPort, and back. Returns the forward tuple and
    /// the reply tuple, as the program matches them.
    func installFlow(_ relay: KernelRelay, _ transport: KernelRelayTuple.TransportProtocol, _ family: Family,
                     clientPort: UInt16, listenerPort: UInt16, natPort: UInt16, endpointPort: UInt16) throws -> (KernelRelayTuple, KernelRelayTuple) {
        let client = Self.bytes(family.client), listener = Self.bytes(family.listener)
        let nat = Self.bytes(family.nat), endpoint = Self.bytes(family.endpoint)
        let forward = try XCTUnwrap(KernelRelayTuple(transport, source: client, sourcePort: clientPort, destination: listener, destinationPort: listenerPort))
        let becomes = try XCTUnwrap(KernelRelayTuple(transport, source: nat, sourcePort: natPort, destination: endpoint, destinationPort: endpointPort))
        let reply = try XCTUnwrap(KernelRelayTuple(transport, source: endpoint, sourcePort: endpointPort, destination: nat, destinationPort: natPort))
        let replyBecomes = try XCTUnwrap(KernelRelayTuple(transport, source: listener, sourcePort: listenerPort, destination: client, destinationPort: clientPort))
        XCTAssertEqual(relay.install(forward, rewrite: becomes), 0)
        XCTAssertEqual(relay.install(reply, rewrite: replyBecomes), 0)
        return (forward, reply)
    }

    /// 64 MiB each way over one TCP connection, IPv4 and IPv6, first as the stacks send it
    /// over veth (CHECKSUM_PARTIAL, GSO skbs of up to 64 KiB), then with full checksums
    /// that the receiving stacks verify; and UDP of 1, 512 and the largest one-packet size.
    /// Every byte arrives as sent, no checksum error anywhere, and the program counted it
    /// all and dropped nothing.
    func testInstalledFlowsCarryTCPBothWaysAndUDPBetweenNamespaces() throws {
        let topology = try RoutedTopology("kfwd")
        let relay = try attachedRelay(topology, capacity: 1024)
        XCTAssertEqual(relay.attachedInterfaces, ["l4b-c", "l4b-e"])
        let size = 64 << 20
        var flow: UInt16 = 0
        for fullChecksums in [false, true] {
            if fullChecksums { try topology.sendFullChecksums() }
            for family in Self.families {
                flow += 1
                let what = "\(family.client), \(fullChecksums ? "full checksums" : "offloaded checksums")"
                let seed = UInt64(flow) * 10
                let backend = try topology.endpoint.run { try TestBackend(.halfCloseFirst(bytes: size, seed: seed), host: family.endpoint) }
                defer { backend.stop() }
                let (forward, reply) = try installFlow(relay, .tcp, family, clientPort: 40000 + flow, listenerPort: 80,
                                                       natPort: 61000 + flow, endpointPort: backend.port)
                let fd = try topology.client.run {
                    try Sockets.connect(host: family.listener, port: 80, timeout: 10, bindTo: family.client, sourcePort: 40000 + flow)
                }
                defer { close(fd) }
                let download = try Sockets.receiveAll(fd)
                XCTAssertEqual(download.count, size, what)
                var expected = PatternStream(seed: seed)
                XCTAssertTrue(download.withUnsafeBytes { expected.matches($0) }, "\(what): the download arrived corrupted")
                var source = PatternStream(seed: seed + 1)
                var chunk = [UInt8](repeating: 0, count: 1 << 20)
                for _ in 0..<(size / chunk.count) {
                    chunk.withUnsafeMutableBytes { source.fill($0) }
                    try Sockets.sendAll(fd, chunk)
                }
                shutdown(fd, Int32(SHUT_WR))
                XCTAssertTrue(waitUntil(timeout: 30) { backend.sinkBytes == size && backend.closed >= 1 },
                              "\(what): the endpoint received \(backend.sinkBytes) of \(size) bytes")
                XCTAssertFalse(backend.sinkMismatch, "\(what): the upload arrived corrupted")
                XCTAssertNotNil(Sockets.waitForClose(fd, timeout: 10), "\(what): the endpoint's close did not reach the client")
                // Payload bytes as the program saw them: at least all of it (a retransmission
                // counts again; exact accounting comes with the TCP state of a later step).
                XCTAssertGreaterThanOrEqual(relay.counters(forward)?.bytes ?? 0, UInt64(size), what)
                XCTAssertGreaterThanOrEqual(relay.counters(reply)?.bytes ?? 0, UInt64(size), what)
            }
        }
        for family in Self.families {
            flow += 1
            let backend = try topology.endpoint.run { try UDPBackend(.echo, host: family.endpoint) }
            defer { backend.stop() }
            let (forward, reply) = try installFlow(relay, .udp, family, clientPort: 40000 + flow, listenerPort: 53,
                                                   natPort: 61000 + flow, endpointPort: backend.port)
            let fd = try topology.client.run {
                try UDPClient.connect(host: family.listener, port: 53, source: family.client, sourcePort: 40000 + flow, timeout: 5)
            }
            defer { close(fd) }
            let sizes = [1, 512, family.largestDatagram]
            for size in sizes {
                let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ size) }
                XCTAssertEqual(UDPClient.exchange(fd, payload), payload, "\(family.client): \(size) bytes")
            }
            let sent = UInt64(sizes.reduce(0, +))
            XCTAssertEqual(relay.counters(forward)?.bytes, sent, "every datagram's payload, exactly")
            XCTAssertEqual(relay.counters(forward)?.packets, 3)
            XCTAssertEqual(relay.counters(reply)?.bytes, sent)
        }
        for namespace in [topology.client, topology.endpoint] {
            XCTAssertEqual(try topology.checksumErrors(in: namespace), [:], "\(namespace.name) received bad checksums")
        }
        let totals = relay.totals()
        XCTAssertGreaterThan(totals.forwarded, 0)
        XCTAssertEqual(totals.droppedNoRoute + totals.droppedForwardingOff + totals.droppedMTU, 0, "\(totals)")
    }

    /// SYNs to a service start their flows in the kernel (step 4): 100 connections per
    /// family, each echoing 64 KiB, reach an endpoint whose address and plan only the
    /// kernel's maps hold, with no flow installed by hand and nothing listening in l4lb's
    /// namespace.
    func testSYNsToAServiceStartTheirFlowsInTheKernel() throws {
        let topology = try RoutedTopology("ksyn")
        let relay = try attachedRelay(topology, capacity: 4096)
        try relay.setNATPorts(first: 61000, count: 4536)
        let connections = 100, size = 64 << 10
        for (listener, family) in Self.families.enumerated() {
            let backend = try topology.endpoint.run { try TestBackend(.echo, host: family.endpoint) }
            defer { backend.stop() }
            let endpoint = SocketAddress(ip: Self.bytes(family.endpoint), port: backend.port)
            try relay.setEndpoint(slot: listener, KernelRelay.Endpoint(address: endpoint.ip, port: endpoint.port))
            let table = MaglevTable(endpoints: [(address: endpoint, weight: 1)], size: 251)
            try relay.setPlan(listener: listener, words: KernelRelayPlan.maglev(table: table.slots, slots: [UInt32(listener)], weights: [1], hashKey: .sourceIPPort))
            try relay.setService(address: Self.bytes(family.listener), port: 80, listener: listener)
            for i in 0..<connections {
                let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i) }
                let fd = try topology.client.run { try Sockets.connect(host: family.listener, port: 80, timeout: 10) }
                defer { close(fd) }
                try Sockets.sendAll(fd, payload)
                shutdown(fd, Int32(SHUT_WR))
                XCTAssertEqual(try Sockets.receiveAll(fd), payload, "\(family.client): connection \(i)")
            }
            XCTAssertEqual(backend.accepted, connections, family.endpoint)
        }
        let totals = relay.totals()
        XCTAssertEqual(totals.newFlows, UInt64(2 * connections))
        XCTAssertEqual(totals.fallbackNoEndpoint + totals.fallbackNoPort + totals.fallbackNoRoute + totals.fallbackTableFull, 0, "\(totals)")
        XCTAssertEqual(totals.droppedNoRoute + totals.droppedForwardingOff + totals.droppedMTU, 0, "\(totals)")
    }
}
