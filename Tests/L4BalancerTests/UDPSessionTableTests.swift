import Foundation
import L4Balancer
import XCTest

/// The worker's UDP sessions: found by client address, kept per listener in
/// least-recently-active order (idle expiry and `max_sessions` eviction take the oldest),
/// and a freed slot's generation never repeats — not even after the table has given its
/// memory back — so a reply still in flight for an ended session stays stale.
final class UDPSessionTableTests: XCTestCase {
    /// A client key for 192.0.2.x:port (IPv4) or 2001:db8::x:port (IPv6).
    func key(_ host: UInt8, port: UInt16, v6: Bool = false) -> UDPClientKey {
        if v6 {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            inet_pton(AF_INET6, "2001:db8::\(host)", &address.sin6_addr)
            return withUnsafeBytes(of: &address) { UDPClientKey($0.baseAddress!, length: $0.count)! }
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        inet_pton(AF_INET, "192.0.2.\(host)", &address.sin_addr)
        return withUnsafeBytes(of: &address) { UDPClientKey($0.baseAddress!, length: $0.count)! }
    }

    func testKeysTellFamilyAddressAndPortApartAndRejectShortNames() {
        XCTAssertEqual(key(1, port: 53), key(1, port: 53))
        XCTAssertNotEqual(key(1, port: 53), key(1, port: 54))
        XCTAssertNotEqual(key(1, port: 53), key(2, port: 53))
        XCTAssertNotEqual(key(1, port: 53), key(1, port: 53, v6: true))
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        XCTAssertNil(withUnsafeBytes(of: &address) { UDPClientKey($0.baseAddress!, length: MemoryLayout<sockaddr_in>.size) })
        var unix = sockaddr_un()
        unix.sun_family = sa_family_t(AF_UNIX)
        XCTAssertNil(withUnsafeBytes(of: &unix) { UDPClientKey($0.baseAddress!, length: $0.count) })
    }

    func testSessionsAreFoundAndKeptOldestFirstPerListener() {
        var table = UDPSessionTable(listeners: 4)
        let a = table.insert(key(1, port: 1000), listener: 1, tick: 1)
        let b = table.insert(key(2, port: 1000), listener: 1, tick: 2)
        let c = table.insert(key(3, port: 1000), listener: 2, tick: 3)
        let lent = table.insert(key(4, port: 1000), listener: 1, tick: 4, indexed: false)
        XCTAssertEqual(table.find(key(1, port: 1000)), a)
        XCTAssertEqual(table.find(key(3, port: 1000)), c)
        XCTAssertNil(table.find(key(4, port: 1000)), "a per-packet record is not found by its client")
        XCTAssertEqual(table.counts[1], 3)
        XCTAssertEqual(table.counts[2], 1)
        XCTAssertEqual(table.oldest(1), a)
        table.touch(a, tick: 5)
        XCTAssertEqual(table.oldest(1), b, "activity moves a session to the back")
        table.remove(b)
        table.remove(lent)
        XCTAssertEqual(table.oldest(1), a)
        XCTAssertEqual(table.oldest(2), c)
        XCTAssertNil(table.oldest(3))
        XCTAssertNil(table.find(key(2, port: 1000)))
        XCTAssertEqual(table.active, 2)
        table.remove(b)  // twice: nothing
        XCTAssertEqual(table.active, 2)
        XCTAssertEqual(table.counts[1], 1)
    }

    func testAReusedSlotHasANewGeneration() {
        var table = UDPSessionTable(listeners: 1)
        let first = table.insert(key(1, port: 1), listener: 0, tick: 0)
        let generation = table.generation(first)
        table.remove(first)
        XCTAssertFalse(table.isLive(first))
        let second = table.insert(key(2, port: 2), listener: 0, tick: 0)
        XCTAssertEqual(second, first, "the slot is reused")
        XCTAssertNotEqual(table.generation(second), generation)
    }

    /// Past `keptWhenEmpty` sessions the table frees its memory when the last one ends;
    /// new sessions then start above every generation handed out before.
    func testGenerationsStayUniqueAcrossTheTableGivingItsMemoryBack() {
        var table = UDPSessionTable(listeners: 1)
        let count = UDPSessionTable.keptWhenEmpty + 100
        var seen: [UInt32: Set<UInt32>] = [:]
        for round in 0..<3 {
            let slots = (0..<count).map { i in table.insert(key(UInt8(i % 250), port: UInt16(i)), listener: 0, tick: UInt32(round)) }
            for slot in slots {
                XCTAssertTrue(seen[slot, default: []].insert(table.generation(slot)).inserted, "slot \(slot) repeated a generation")
            }
            for slot in slots.reversed() { table.remove(slot) }
            XCTAssertEqual(table.active, 0)
            XCTAssertNil(table.oldest(0))
        }
    }
}
