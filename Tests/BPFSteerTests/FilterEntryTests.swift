import BPFSteer
import XCTest

final class FilterEntryTests: XCTestCase {
    func testParsesPrefixesAndPorts() throws {
        XCTAssertEqual(try FilterEntry.parse("192.0.2.7/24").get().description, "192.0.2.0/24")
        XCTAssertEqual(try FilterEntry.parse("192.0.2.7").get().description, "192.0.2.7/32")
        XCTAssertEqual(try FilterEntry.parse("2001:db8::1").get().description, "2001:db8::1/128")
        XCTAssertEqual(try FilterEntry.parse("2001:db8:ffff::/33").get().description, "2001:db8:8000::/33")
        XCTAssertEqual(try FilterEntry.parse("0.0.0.0/0").get().description, "0.0.0.0/0")
        XCTAssertEqual(try FilterEntry.parse("tcp/23").get(), .port(PortRule(.tcp, 23)))
        XCTAssertEqual(try FilterEntry.parse("udp/65535").get(), .port(PortRule(.udp, 65535)))
    }

    func testRejectsWhatIsNotAnEntry() {
        for bad in ["", "192.0.2.0/33", "2001:db8::/129", "tcp/0", "tcp/65536", "sctp/80", "example.com", "192.0.2.0/x"] {
            XCTAssertThrowsError(try FilterEntry.parse(bad).get(), bad)
        }
    }

    func testContainsFollowsThePrefixLength() throws {
        let prefix = try SourcePrefix.parse("198.51.100.128/25").get()
        let inside: [UInt8] = [198, 51, 100, 200]
        let outside: [UInt8] = [198, 51, 100, 127]
        XCTAssertTrue(inside.withUnsafeBytes { prefix.contains($0) })
        XCTAssertFalse(outside.withUnsafeBytes { prefix.contains($0) })
        let everything = try SourcePrefix.parse("0.0.0.0/0").get()
        XCTAssertTrue(outside.withUnsafeBytes { everything.contains($0) })
    }
}
