import BPFSteer
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The kernel forwarder's rewrite and routing (issue 35, steps 2 and 3), run in the real
/// kernel on packets built here (BPF_PROG_TEST_RUN: nothing is sent anywhere), inside a
/// namespace with routes to both sides. Every checksum of the packet that leaves is
/// verified from scratch, so an incremental fix-up that is off by a carry, a byte order or
/// an odd length fails.
final class KernelRelayProgramTests: XCTestCase {
    struct Endpoint { var ip: [UInt8]; var port: UInt16 }

    static func ip(_ text: String) -> [UInt8] {
        if text.contains(":") {
            var a = in6_addr()
            precondition(inet_pton(AF_INET6, text, &a) == 1)
            return withUnsafeBytes(of: a) { Array($0) }
        }
        var a = in_addr()
        precondition(inet_pton(AF_INET, text, &a) == 1)
        return withUnsafeBytes(of: a) { Array($0) }
    }

    /// The Internet checksum's ones' complement sum of `bytes`, folded (RFC 1071).
    static func sum(_ bytes: [UInt8], _ initial: UInt32 = 0) -> UInt32 {
        var total = initial
        var i = 0
        while i + 1 < bytes.count {
            total += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1])
            i += 2
        }
        if i < bytes.count { total += UInt32(bytes[i]) << 8 }
        while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
        return total
    }

    static func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    /// The pseudo-header's sum for an L4 segment of `length` bytes.
    static func pseudo(_ source: [UInt8], _ destination: [UInt8], _ protocolNumber: UInt8, _ length: Int) -> UInt32 {
        let lengthBytes = source.count == 4 ? be16(length) : [0, 0] + be16(length)
        let tail: [UInt8] = source.count == 4 ? [0, protocolNumber] : [0, 0, 0, protocolNumber]
        return sum(source + destination + tail + lengthBytes)
    }

    /// An Ethernet frame carrying one TCP segment or UDP datagram, every checksum right
    /// (or a UDP checksum of 0 when `udpChecksum` is false).
    static func frame(_ transport: KernelRelayTuple.TransportProtocol, from s: Endpoint, to d: Endpoint, payload: [UInt8],
                      ttl: UInt8 = 64, udpChecksum: Bool = true, fragment: Bool = false, tcpFlags: UInt8 = 0x18) -> [UInt8] {
        var l4: [UInt8]
        switch transport {
        case .tcp:
            l4 = be16(Int(s.port)) + be16(Int(d.port)) + [0, 0, 0x10, 0x01] + [0, 0, 0x20, 0x02] + [0x50, tcpFlags] + be16(502) + [0, 0] + [0, 0]
        case .udp:
            l4 = be16(Int(s.port)) + be16(Int(d.port)) + be16(8 + payload.count) + [0, 0]
        }
        l4 += payload
        let checksumAt = transport == .tcp ? 16 : 6
        if transport == .tcp || udpChecksum {
            var c = ~sum(l4, pseudo(s.ip, d.ip, transport.rawValue, l4.count)) & 0xFFFF
            if transport == .udp, c == 0 { c = 0xFFFF }
            l4[checksumAt] = UInt8(c >> 8)
            l4[checksumAt + 1] = UInt8(c & 0xFF)
        }
        let ethernet: [UInt8] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1] + (s.ip.count == 4 ? [0x08, 0x00] : [0x86, 0xDD])
        if s.ip.count == 4 {
            var header: [UInt8] = [0x45, 0] + be16(20 + l4.count) + [0x12, 0x34] + (fragment ? [0x20, 0] : [0x40, 0])
                + [ttl, transport.rawValue, 0, 0] + s.ip + d.ip
            let c = ~sum(header) & 0xFFFF
            header[10] = UInt8(c >> 8)
            header[11] = UInt8(c & 0xFF)
            return ethernet + header + l4
        }
        return ethernet + [0x60, 0, 0, 0] + be16(l4.count) + [transport.rawValue, ttl] + s.ip + d.ip + l4
    }

    /// Checks `packet` from scratch: its addresses, ports, TTL, payload and every checksum.
    func verify(_ packet: [UInt8], _ transport: KernelRelayTuple.TransportProtocol, from s: Endpoint, to d: Endpoint, payload: [UInt8],
                ttl: UInt8, udpChecksumNone: Bool = false, file: StaticString = #filePath, line: UInt = #line) {
        let v4 = s.ip.count == 4
        let l3 = 14, l4 = v4 ? 34 : 54
        guard packet.count == l4 + (transport == .tcp ? 20 : 8) + payload.count else {
            return XCTFail("length \(packet.count)", file: file, line: line)
        }
        let addresses = v4 ? Array(packet[(l3 + 12)..<(l3 + 20)]) : Array(packet[(l3 + 8)..<(l3 + 40)])
        XCTAssertEqual(addresses, s.ip + d.ip, "addresses", file: file, line: line)
        XCTAssertEqual(Array(packet[l4..<(l4 + 4)]), KernelRelayProgramTests.be16(Int(s.port)) + KernelRelayProgramTests.be16(Int(d.port)),
                       "ports", file: file, line: line)
        XCTAssertEqual(packet[v4 ? l3 + 8 : l3 + 7], ttl, "TTL / hop limit", file: file, line: line)
        XCTAssertEqual(Array(packet.suffix(payload.count)), payload, "payload", file: file, line: line)
        if v4 {
            XCTAssertEqual(KernelRelayProgramTests.sum(Array(packet[l3..<l4])), 0xFFFF, "IPv4 header checksum", file: file, line: line)
        }
        let segment = Array(packet[l4...])
        if udpChecksumNone {
            XCTAssertEqual(Array(segment[6..<8]), [0, 0], "a UDP checksum of 0 (none) stays 0", file: file, line: line)
        } else {
            XCTAssertEqual(KernelRelayProgramTests.sum(segment, KernelRelayProgramTests.pseudo(s.ip, d.ip, transport.rawValue, segment.count)),
                           0xFFFF, "\(transport) checksum", file: file, line: line)
        }
    }

    func tuple(_ transport: KernelRelayTuple.TransportProtocol, _ s: Endpoint, _ d: Endpoint) throws -> KernelRelayTuple {
        try XCTUnwrap(KernelRelayTuple(transport, source: s.ip, sourcePort: s.port, destination: d.ip, destinationPort: d.port))
    }

    /// Both directions of a flow, TCP and UDP, IPv4 and IPv6, payloads of even and odd
    /// length (the checksum's trailing byte): rewritten to the other side's view, TTL down
    /// by one, every checksum right, each direction counted.
    func testBothDirectionsAreRewrittenWithEveryChecksumRight() throws {
        try RoutedScratchNamespace().run { try self.bothDirections() }
    }

    private func bothDirections() throws {
        let relay = try KernelRelay(capacity: 64)
        let families: [(client: String, listener: String, nat: String, endpoint: String)] = [
            ("198.51.100.7", "198.51.100.1", "203.0.113.1", "203.0.113.10"),
            ("2001:db8:1::7", "2001:db8:1::1", "2001:db8:2::1", "2001:db8:2::10"),
        ]
        for family in families {
            for transport in [KernelRelayTuple.TransportProtocol.tcp, .udp] {
                let client = Endpoint(ip: Self.ip(family.client), port: 40000), listener = Endpoint(ip: Self.ip(family.listener), port: 80)
                let nat = Endpoint(ip: Self.ip(family.nat), port: 61000), endpoint = Endpoint(ip: Self.ip(family.endpoint), port: 8080)
                XCTAssertEqual(relay.install(try tuple(transport, client, listener), rewrite: try tuple(transport, nat, endpoint)), 0)
                XCTAssertEqual(relay.install(try tuple(transport, endpoint, nat), rewrite: try tuple(transport, listener, client)), 0)
                var sent = 0
                for size in [0, 1, 2, 511, 1400] {
                    let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ size) }
                    let forward = try relay.run(Self.frame(transport, from: client, to: listener, payload: payload))
                    XCTAssertEqual(forward.verdict, .redirect, "\(transport) \(family.client) \(size) B")
                    verify(forward.packet, transport, from: nat, to: endpoint, payload: payload, ttl: 63)
                    let reply = try relay.run(Self.frame(transport, from: endpoint, to: nat, payload: payload, ttl: 2))
                    XCTAssertEqual(reply.verdict, .redirect)
                    verify(reply.packet, transport, from: listener, to: client, payload: payload, ttl: 1)
                    sent += size
                }
                for direction in [try tuple(transport, client, listener), try tuple(transport, endpoint, nat)] {
                    let counters = try XCTUnwrap(relay.counters(direction))
                    XCTAssertEqual(counters.packets, 5)
                    XCTAssertEqual(counters.bytes, UInt64(sent), "payload bytes, headers not counted")
                    XCTAssertGreaterThan(counters.lastNanoseconds, 0)
                }
            }
        }
        XCTAssertEqual(relay.totals().forwarded, 2 * 2 * 2 * 5)
    }

    /// A UDP datagram sent without a checksum (0, IPv4 only) is rewritten and keeps 0.
    func testAMissingIPv4UDPChecksumStaysMissing() throws {
        try RoutedScratchNamespace().run { try self.missingChecksum() }
    }

    private func missingChecksum() throws {
        let relay = try KernelRelay(capacity: 8)
        let client = Endpoint(ip: Self.ip("198.51.100.7"), port: 5353), listener = Endpoint(ip: Self.ip("198.51.100.1"), port: 53)
        let nat = Endpoint(ip: Self.ip("203.0.113.1"), port: 61001), endpoint = Endpoint(ip: Self.ip("203.0.113.10"), port: 53)
        XCTAssertEqual(relay.install(try tuple(.udp, client, listener), rewrite: try tuple(.udp, nat, endpoint)), 0)
        let payload = Array("no checksum".utf8)
        let out = try relay.run(Self.frame(.udp, from: client, to: listener, payload: payload, udpChecksum: false))
        XCTAssertEqual(out.verdict, .redirect)
        verify(out.packet, .udp, from: nat, to: endpoint, payload: payload, ttl: 63, udpChecksumNone: true)
    }

    /// What the forwarder must leave to the stack, untouched: no flow, the other protocol or
    /// ports of a flow, a TTL that would expire here, a fragment.
    func testWhatItDoesNotTakeGoesOnUntouched() throws {
        let relay = try KernelRelay(capacity: 8)
        let client = Endpoint(ip: Self.ip("198.51.100.7"), port: 40000), listener = Endpoint(ip: Self.ip("198.51.100.1"), port: 80)
        let nat = Endpoint(ip: Self.ip("203.0.113.1"), port: 61000), endpoint = Endpoint(ip: Self.ip("203.0.113.10"), port: 8080)
        XCTAssertEqual(relay.install(try tuple(.tcp, client, listener), rewrite: try tuple(.tcp, nat, endpoint)), 0)
        XCTAssertEqual(relay.install(try tuple(.tcp, client, listener), rewrite: try tuple(.tcp, nat, endpoint)), EEXIST)
        let payload = Array("hello".utf8)
        let cases: [(String, [UInt8])] = [
            ("UDP on a TCP flow's tuple", Self.frame(.udp, from: client, to: listener, payload: payload)),
            ("another source port", Self.frame(.tcp, from: Endpoint(ip: client.ip, port: 40001), to: listener, payload: payload)),
            ("the reply direction, not installed", Self.frame(.tcp, from: endpoint, to: nat, payload: payload)),
            ("TTL 1", Self.frame(.tcp, from: client, to: listener, payload: payload, ttl: 1)),
            ("a fragment", Self.frame(.tcp, from: client, to: listener, payload: payload, fragment: true)),
        ]
        for (name, packet) in cases {
            let out = try relay.run(packet)
            XCTAssertEqual(out.verdict, .next, name)
            XCTAssertEqual(out.packet, packet, "\(name): changed")
        }
        XCTAssertEqual(relay.counters(try tuple(.tcp, client, listener))?.packets, 0)
    }

    /// A flow whose rewritten destination has no route, or that arrives where forwarding
    /// is off, is dropped and counted, not passed to the stack half rewritten; once
    /// forwarding is on the same packet goes through.
    func testAPacketWithNowhereToGoIsDroppedAndCounted() throws {
        let scratch = try RoutedScratchNamespace(forwarding: false)
        let relay = try KernelRelay(capacity: 8)
        let client = Endpoint(ip: Self.ip("198.51.100.7"), port: 40000), listener = Endpoint(ip: Self.ip("198.51.100.1"), port: 80)
        let nat = Endpoint(ip: Self.ip("203.0.113.1"), port: 61000), endpoint = Endpoint(ip: Self.ip("203.0.113.10"), port: 8080)
        let unrouted = Endpoint(ip: Self.ip("192.0.2.10"), port: 8080)
        XCTAssertEqual(relay.install(try tuple(.tcp, client, listener), rewrite: try tuple(.tcp, nat, endpoint)), 0)
        let other = Endpoint(ip: client.ip, port: 40001)
        XCTAssertEqual(relay.install(try tuple(.tcp, other, listener), rewrite: try tuple(.tcp, nat, unrouted)), 0)
        let payload = Array("hello".utf8)
        try scratch.run {
            XCTAssertEqual(try relay.run(Self.frame(.tcp, from: client, to: listener, payload: payload)).verdict, .drop)
            XCTAssertEqual(relay.totals().droppedForwardingOff, 1)
        }
        try scratch.setForwarding(true)
        try scratch.run {
            XCTAssertEqual(try relay.run(Self.frame(.tcp, from: client, to: listener, payload: payload)).verdict, .redirect)
            XCTAssertEqual(try relay.run(Self.frame(.tcp, from: other, to: listener, payload: payload)).verdict, .drop)
        }
        var expected = KernelRelay.Totals()
        expected.forwarded = 1
        expected.droppedForwardingOff = 1
        expected.droppedNoRoute = 1
        XCTAssertEqual(relay.totals(), expected)
        XCTAssertEqual(relay.counters(try tuple(.tcp, client, listener))?.packets, 1, "only the packet that left is counted on its flow")
    }
}
