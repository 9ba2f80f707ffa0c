import L4Balancer
import XCTest

/// The DNS messages discovery sends and reads (issue 36), and the `dns:` section of a cluster.
final class DNSMessageTests: XCTestCase {
    func testAQueryAsksForRecursionAndOffersEDNS0() throws {
        let query = try XCTUnwrap(DNSMessage.query(id: 0x1234, name: "web.svc.test", type: DNSMessage.typeSRV))
        XCTAssertEqual(Array(query[0..<12]), [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1], "ID, RD, one question, one additional")
        XCTAssertEqual(Array(query[12..<26]), [3] + Array("web".utf8) + [3] + Array("svc".utf8) + [4] + Array("test".utf8) + [0])
        XCTAssertEqual(Array(query[26..<30]), [0, 33, 0, 1], "SRV, IN")
        XCTAssertEqual(Array(query[30...]), [0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0], "OPT offering 1,232 bytes")
        XCTAssertNil(DNSMessage.query(id: 1, name: String(repeating: "a", count: 64) + ".test", type: DNSMessage.typeA))
    }

    /// An answer as a server writes it: the question, then records whose names point back
    /// at it, an SRV target compressed too, and a CNAME that discovery skips.
    func testAnAnswerIsReadThroughCompressionPointers() throws {
        var m: [UInt8] = [0xAB, 0xCD, 0x85, 0x80, 0, 1, 0, 4, 0, 0, 0, 0]
        let question = m.count  // 12
        m += [3] + Array("web".utf8) + [3] + Array("svc".utf8) + [4] + Array("test".utf8) + [0] + [0, 33, 0, 1]
        func pointer(_ offset: Int) -> [UInt8] { [0xC0 | UInt8(offset >> 8), UInt8(offset & 0xFF)] }
        // A 127.0.0.11, TTL 2.
        m += pointer(question) + [0, 1, 0, 1, 0, 0, 0, 2, 0, 4, 127, 0, 0, 11]
        // AAAA ::1, TTL 300.
        m += pointer(question) + [0, 28, 0, 1, 0, 0, 1, 44, 0, 16] + [UInt8](repeating: 0, count: 15) + [1]
        // SRV 10 60 8080 a.<svc.test>, TTL 30: the target's tail points at "svc.test" in the question.
        let target: [UInt8] = [1] + Array("a".utf8) + pointer(question + 4)
        m += pointer(question) + [0, 33, 0, 1, 0, 0, 0, 30, 0, UInt8(6 + target.count), 0, 10, 0, 60, 0x1F, 0x90] + target
        // CNAME.
        m += pointer(question) + [0, 5, 0, 1, 0, 0, 0, 5, 0, 2] + pointer(question)
        let answer = try DNSMessage.parse(m)
        XCTAssertEqual(answer.id, 0xABCD)
        XCTAssertEqual(answer.rcode, 0)
        XCTAssertFalse(answer.truncated)
        XCTAssertEqual(answer.records, [
            .init(name: "web.svc.test", type: 1, ttl: 2, data: .address([127, 0, 0, 11])),
            .init(name: "web.svc.test", type: 28, ttl: 300, data: .address([UInt8](repeating: 0, count: 15) + [1])),
            .init(name: "web.svc.test", type: 33, ttl: 30, data: .service(priority: 10, weight: 60, port: 8080, target: "a.svc.test")),
            .init(name: "web.svc.test", type: 5, ttl: 5, data: .other),
        ])
        // TC and NXDOMAIN in the flags.
        var truncated = m
        truncated[2] |= 0x02
        truncated[3] = 0x83
        let flagged = try DNSMessage.parse(truncated)
        XCTAssertTrue(flagged.truncated)
        XCTAssertEqual(flagged.rcode, 3)
    }

    func testMalformedAnswersAreRefusedWithAReason() {
        func reason(_ bytes: [UInt8]) -> String? {
            do { _ = try DNSMessage.parse(bytes); return nil } catch { return error.description }
        }
        XCTAssertEqual(reason([0, 1, 0x81, 0]), "the message ends early (4 bytes)")
        XCTAssertEqual(reason([0, 1, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "a DNS query, not an answer")
        // A pointer to itself: no loop.
        XCTAssertEqual(reason([0, 1, 0x81, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1]), "a compression pointer that does not point back")
        // An address record of 3 bytes.
        XCTAssertEqual(reason([0, 1, 0x81, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 3, 1, 2, 3]), "an address record of 3 bytes")
        // Data running past the end.
        XCTAssertEqual(reason([0, 1, 0x81, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2]), "a record's data runs past the message")
    }

    func testTheDNSSectionOfACluster() throws {
        func parse(_ dns: String) -> Result<Config, ConfigErrors> {
            ConfigParser.parse(yaml: """
                listeners: [{ name: web, address: 127.0.0.1:8080, cluster: web }]
                clusters:
                  - { name: web, \(dns) }
                """)
        }
        let config = try parse("dns: { name: web.svc.test, type: A, port: 9000, resolvers: [127.0.0.1:5353], min_ttl: 2s, hold: 1m }").get()
        let dns = try XCTUnwrap(config.clusters[0].dns)
        XCTAssertEqual(dns.name, "web.svc.test")
        XCTAssertEqual(dns.type, .a)
        XCTAssertEqual(dns.port, 9000)
        XCTAssertEqual(dns.resolvers.map(\.description), ["127.0.0.1:5353"])
        XCTAssertEqual(dns.minTTL, .seconds(2))
        XCTAssertEqual(dns.hold, .seconds(60))
        XCTAssertEqual(config.clusters[0].endpoints, [])

        func errors(_ dns: String) -> [String] {
            guard case .failure(let failure) = parse(dns) else { return [] }
            return failure.errors.map(\.description)
        }
        XCTAssertEqual(errors("dns: { name: web.svc.test, type: A }"), ["clusters[0].dns.port: required for type A"])
        XCTAssertEqual(errors("dns: { name: web.svc.test, type: SRV, port: 80 }"), ["clusters[0].dns.port: SRV records carry their own ports; remove it"])
        XCTAssertEqual(errors("dns: { name: web.svc.test, port: 80 }, endpoints: [{ address: 127.0.0.1:1 }]"),
                       ["clusters[0].dns: a cluster takes its endpoints from endpoints: or from dns:, not both"])
        XCTAssertEqual(errors("dns: { name: \"a..b\", port: 80 }"), ["clusters[0].dns.name: 'a..b' is not a DNS name"])
        XCTAssertEqual(errors("dns: { name: web.svc.test, port: 80, min_ttl: 10m, max_ttl: 1m }"), ["clusters[0].dns.min_ttl: 10m is above max_ttl 1m"])
        XCTAssertEqual(errors("balancer: round_robin"), ["clusters[0].endpoints: required (or dns:)"])
    }
}
