import BPFSteer
import Foundation
import XCTest

/// The real program and maps in the kernel (CI runs as root): what is written to the
/// pinned maps is read back, and is still there for the next process.
final class XDPFilterTests: XCTestCase {
    var pinPath = ""

    override func setUp() {
        pinPath = "/sys/fs/bpf/l4lb-unit-\(getpid())-\(UUID().uuidString.prefix(8))"
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: pinPath)
    }

    func testEntriesRoundTripThroughPinnedMaps() throws {
        let entries = try ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32", "tcp/23", "udp/19", "udp/23"]
            .map { try FilterEntry.parse($0).get() }
        do {
            let filter = try XDPFilter(pinPath: pinPath)
            XCTAssertGreaterThan(filter.programID, 0)
            for entry in entries { try filter.set(entry, in: .blocked, origins: .config) }
            try filter.set(entries[1], in: .blocked, origins: [.config, .runtime])
            try filter.set(.source(try SourcePrefix.parse("192.0.2.7").get()), in: .allowed, origins: .config)
        }
        // A second load (as after a restart) finds the same lists.
        let reopened = try XDPFilter(pinPath: pinPath)
        let blocked = reopened.entries(.blocked)
        XCTAssertEqual(Set(blocked.keys), Set(entries))
        XCTAssertEqual(blocked[entries[1]], [.config, .runtime])
        XCTAssertEqual(blocked[entries[0]], .config)
        XCTAssertEqual(reopened.entries(.allowed).keys.map(\.description), ["192.0.2.7/32"])

        // Removing every origin removes the entry; one port's other protocol stays.
        try reopened.set(entries[3], in: .blocked, origins: [])
        try reopened.set(entries[5], in: .blocked, origins: [])
        try reopened.set(entries[0], in: .blocked, origins: [])
        XCTAssertEqual(Set(reopened.entries(.blocked).keys), Set([entries[1], entries[2], entries[4]]))
    }
}
