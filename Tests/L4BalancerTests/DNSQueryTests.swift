import L4Balancer
import XCTest

/// The `dns` health check's query and its reading of answers (RFC 1035 §4).
final class DNSQueryTests: XCTestCase {
    func testNamesInWireForm() {
        XCTAssertEqual(DNSQuery.encodeName("example.com"), [7] + Array("example".utf8) + [3] + Array("com".utf8) + [0])
        XCTAssertEqual(DNSQuery.encodeName("example.com."), DNSQuery.encodeName("example.com"), "a trailing dot is the root")
        XCTAssertEqual(DNSQuery.encodeName("."), [0])
        XCTAssertNil(DNSQuery.encodeName("a..b"), "an empty label")
        XCTAssertNil(DNSQuery.encodeName(String(repeating: "a", count: 64) + ".com"), "a label over 63 bytes")
        let long = Array(repeating: String(repeating: "a", count: 63), count: 4).joined(separator: ".")
        XCTAssertNil(DNSQuery.encodeName(long), "a name over 255 bytes")
    }

    func testQueryHeaderAndQuestion() {
        let message = DNSQuery.message(query: "a.example", type: DNSQuery.types["AAAA"]!)
        // ID 0, RD set, one question, nothing else.
        XCTAssertEqual(Array(message[0..<12]), [0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(Array(message[12...]), DNSQuery.encodeName("a.example")! + [0, 28, 0, 1])
    }

    /// An answer is read by its ID, QR bit and RCODE; over TCP after its length, and only
    /// once the whole message is there.
    func testAnswersAreJudgedByIDAndRCODE() {
        var answer = DNSQuery.message(query: "a.example", type: 1)
        answer[0] = 0x12
        answer[1] = 0x34
        answer[2] |= 0x80  // QR: an answer
        answer[3] = 0x83  // RA, NXDOMAIN
        XCTAssertEqual(DNSQuery.judge(answer, id: 0x1234, stream: false), .answer(rcode: 3))
        XCTAssertEqual(DNSQuery.rcodeName(3), "NXDOMAIN")
        XCTAssertEqual(DNSQuery.rcodeName(9), "rcode 9")
        XCTAssertEqual(DNSQuery.judge(answer, id: 0x1235, stream: false), .invalid("a DNS answer with ID 4660, expected 4661"))
        var query = answer
        query[2] &= 0x7F
        XCTAssertEqual(DNSQuery.judge(query, id: 0x1234, stream: false), .invalid("a DNS query, not an answer"))
        XCTAssertEqual(DNSQuery.judge(Array(answer[0..<5]), id: 0x1234, stream: false), .invalid("a reply of 5 bytes, not DNS"))

        let framed = [UInt8(answer.count >> 8), UInt8(answer.count & 0xFF)] + answer
        for cut in 0..<framed.count {
            XCTAssertEqual(DNSQuery.judge(Array(framed[0..<cut]), id: 0x1234, stream: true), .incomplete, "cut at \(cut)")
        }
        XCTAssertEqual(DNSQuery.judge(framed, id: 0x1234, stream: true), .answer(rcode: 3))
        XCTAssertEqual(DNSQuery.judge([0, 3, 1, 2, 3], id: 0, stream: true), .invalid("a DNS message of 3 bytes"))
    }
}
