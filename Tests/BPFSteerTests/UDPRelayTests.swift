import BPFSteer
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The UDP relay's tuples and flow table, in the real kernel (CI runs as root).
final class UDPRelayTests: XCTestCase {
    func address(_ text: String, _ port: UInt16) -> sockaddr_in6 {
        var storage = sockaddr_in6()
        withUnsafeMutableBytes(of: &storage) { raw in
            if text.contains(":") {
                var sin6 = sockaddr_in6()
                sin6.sin6_family = sa_family_t(AF_INET6)
                sin6.sin6_port = port.bigEndian
                XCTAssertEqual(inet_pton(AF_INET6, text, &sin6.sin6_addr), 1, text)
                raw.storeBytes(of: sin6, as: sockaddr_in6.self)
            } else {
                var sin = sockaddr_in()
                sin.sin_family = sa_family_t(AF_INET)
                sin.sin_port = port.bigEndian
                XCTAssertEqual(inet_pton(AF_INET, text, &sin.sin_addr), 1, text)
                raw.storeBytes(of: sin, as: sockaddr_in.self)
            }
        }
        return storage
    }

    func tuple(_ source: String, _ destination: String) -> UDPRelayTuple? {
        var a = address(source, 1000), b = address(destination, 2000)
        return UDPRelayTuple(source: &a, destination: &b)
    }

    func testOnlyLoopbackPairsOfOneFamilyAreRelayed() {
        XCTAssertEqual(tuple("127.0.0.1", "127.0.0.53")?.family, 4)
        XCTAssertEqual(tuple("::1", "::1")?.family, 6)
        // An IPv4-mapped address is IPv4 on the wire.
        XCTAssertEqual(tuple("::ffff:127.0.0.1", "127.0.0.1")?.family, 4)
        XCTAssertEqual(tuple("::ffff:127.0.0.1", "127.0.0.1"), tuple("127.0.0.1", "127.0.0.1"))
        XCTAssertNil(tuple("192.0.2.1", "127.0.0.1"), "not on lo")
        XCTAssertNil(tuple("127.0.0.1", "2001:db8::1"))
        XCTAssertNil(tuple("::ffff:192.0.2.1", "127.0.0.1"))
        XCTAssertNil(tuple("127.0.0.1", "::1"), "two families")
    }

    func testFlowsAreInstalledCountedAndTaken() throws {
        let relay = try UDPRelay(capacity: 4)
        let match = try XCTUnwrap(tuple("127.0.0.1", "127.0.0.2")), rewrite = try XCTUnwrap(tuple("127.0.0.3", "127.0.0.4"))
        XCTAssertNil(relay.flows.counters(match))
        XCTAssertEqual(relay.flows.install(match, rewrite: rewrite), 0)
        XCTAssertEqual(relay.flows.counters(match), UDPRelayFlows.Counters())
        // Full: a table of 4 flows takes no fifth.
        for i in 5...7 { XCTAssertEqual(relay.flows.install(try XCTUnwrap(tuple("127.0.0.\(i)", "127.0.0.2")), rewrite: rewrite), 0) }
        XCTAssertNotEqual(relay.flows.install(try XCTUnwrap(tuple("127.0.0.8", "127.0.0.2")), rewrite: rewrite), 0)
        XCTAssertEqual(relay.flows.take(match), UDPRelayFlows.Counters())
        XCTAssertNil(relay.flows.take(match), "taken once")
        XCTAssertEqual(relay.flows.install(try XCTUnwrap(tuple("127.0.0.8", "127.0.0.2")), rewrite: rewrite), 0, "room again")
    }
}
