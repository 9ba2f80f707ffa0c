import L4Balancer
import XCTest

/// The ClientHello reader behind SNI routing: real ClientHellos, every way of cutting
/// them, hostile lengths, and a million mutated and random inputs that must never crash.
final class ClientHelloTests: XCTestCase {
    /// `openssl s_client -servername api.example.test` (OpenSSL 3.0), as captured.
    static let openssl: [UInt8] = hex(
        "160301013d010001390303f5443a7450c617a51b669e8956fb82c54273e26be629ebbed1cb53670744089b20a1235614e1c678761b416036e395a57c987671d7b306fa777479cbacdd677f5c003e130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000b20000001500130000106170692e6578616d706c652e74657374000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d0020f86c451c8ee96b4fe68efd19bbad5df80761f43069e50d9cc4b2152ea9351046")

    static func hex(_ text: String) -> [UInt8] {
        var out: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2)
            out.append(UInt8(text[index..<next], radix: 16)!)
            index = next
        }
        return out
    }

    func parse(_ bytes: [UInt8]) -> ClientHello.Verdict { bytes.withUnsafeBytes { ClientHello.parse($0) } }

    func name(_ bytes: [UInt8]) -> String? {
        guard case .complete(let offset, let length) = parse(bytes), length > 0 else { return nil }
        return String(decoding: bytes[offset..<(offset + length)], as: UTF8.self)
    }

    /// A ClientHello with `name` (nil: no SNI) and `padding` bytes of an extra extension,
    /// split into records of at most `recordSize` bytes.
    static func make(name: String?, padding: Int = 0, recordSize: Int = 16_384) -> [UInt8] {
        var body: [UInt8] = [3, 3] + [UInt8](repeating: 7, count: 32) + [0] + [0, 2, 0x13, 0x01] + [1, 0]
        var extensions: [UInt8] = []
        if let name {
            let n = Array(name.utf8)
            let entry: [UInt8] = [0] + be16(n.count) + n
            extensions += [0, 0] + be16(entry.count + 2) + be16(entry.count) + entry
        }
        if padding > 0 { extensions += [0, 21] + be16(padding) + [UInt8](repeating: 0, count: padding) }
        body += be16(extensions.count) + extensions
        let message: [UInt8] = [1, UInt8(body.count >> 16), UInt8(body.count >> 8 & 0xFF), UInt8(body.count & 0xFF)] + body
        var out: [UInt8] = []
        var offset = 0
        while offset < message.count {
            let chunk = message[offset..<min(message.count, offset + recordSize)]
            out += [0x16, 3, 1] + be16(chunk.count) + chunk
            offset += chunk.count
        }
        return out
    }

    static func be16(_ value: Int) -> [UInt8] { [UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF)] }

    func testReadsTheServerNameOfARealClientHello() {
        XCTAssertEqual(name(Self.openssl), "api.example.test")
        XCTAssertEqual(name(Self.make(name: "B.Example.Test")), "B.Example.Test")
        XCTAssertEqual(parse(Self.make(name: nil)), .complete(offset: 0, length: 0), "no SNI: complete, no name")
    }

    /// Every prefix asks for more (never invalid), and for no more than the whole.
    func testEveryPrefixAsksForMoreUpToTheWhole() {
        for hello in [Self.openssl, Self.make(name: "x.example.test", padding: 3000, recordSize: 700)] {
            for cut in 0..<hello.count {
                guard case .needMore(let total) = parse(Array(hello[..<cut])) else {
                    return XCTFail("prefix of \(cut) bytes: \(parse(Array(hello[..<cut])))")
                }
                XCTAssertGreaterThan(total, cut)
                XCTAssertLessThanOrEqual(total, hello.count)
            }
        }
    }

    func testAClientHelloOverSeveralRecordsIsRead() {
        let hello = Self.make(name: "split.example.test", padding: 5000, recordSize: 1000)
        XCTAssertEqual(name(hello), "split.example.test")
        // The name across a record boundary cannot be matched in place: refused, not misread.
        let small = Self.make(name: "boundary.example.test", recordSize: 60)
        XCTAssertEqual(parse(small), .invalid)
    }

    func testHostileInputsAreRefused() {
        XCTAssertEqual(parse(Array("GET / HTTP/1.1\r\nHost: a\r\n\r\n".utf8)), .invalid)
        XCTAssertEqual(parse([0x16, 3, 1, 0, 0]), .invalid, "empty record")
        XCTAssertEqual(parse([0x16, 3, 1, 0x40, 0x01]), .invalid, "record over 16 KiB")
        XCTAssertEqual(parse([0x16, 3, 1, 0, 4, 2, 0, 0, 0]), .invalid, "not a ClientHello")
        // A ClientHello declaring 20 KiB is oversize as soon as its header is in.
        XCTAssertEqual(parse([0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x4E, 0x20]), .oversize)
        XCTAssertEqual(parse(Self.make(name: "big.example.test", padding: 20_000)), .oversize)
        var badName = Self.make(name: "bad name.test")
        XCTAssertEqual(parse(badName), .invalid, "a space in the name")
        badName = Self.make(name: "a..b")
        XCTAssertEqual(parse(badName), .invalid, "an empty label")
        // Lengths that point past their container.
        var hello = Self.make(name: "a.example.test")
        hello[5 + 4 + 34 + 1] = 0xFF  // cipher-suite length
        XCTAssertNotEqual(name(hello), "a.example.test")
    }

    /// 1,000,000 inputs: mutations of valid ClientHellos (bytes flipped, lengths changed,
    /// cut, extended) and random bytes behind a handshake header. None may crash; every
    /// verdict's name lies inside the input and is a host name.
    func testAMillionMutatedInputsNeverCrash() {
        var random = SystemRandomNumberGenerator()
        let seeds = [Self.openssl, Self.make(name: "a.example.test"), Self.make(name: "b.example.test", padding: 900, recordSize: 300)]
        var verdicts: [String: Int] = [:]
        for i in 0..<1_000_000 {
            var input: [UInt8]
            if i % 10 == 9 {
                input = [0x16, 3, 1] + Self.be16(Int.random(in: 1...600, using: &random)) + [1]
                    + (0..<Int.random(in: 0...600, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            } else {
                input = seeds[i % seeds.count]
                for _ in 0..<Int.random(in: 1...4, using: &random) {
                    let position = Int.random(in: 0..<input.count, using: &random)
                    switch Int.random(in: 0..<4, using: &random) {
                    case 0: input[position] = UInt8.random(in: 0...255, using: &random)
                    case 1: input[position] ^= 1 << UInt8.random(in: 0...7, using: &random)
                    case 2: input = Array(input[..<position])
                    default: input += [UInt8](repeating: UInt8.random(in: 0...255, using: &random), count: Int.random(in: 1...64, using: &random))
                    }
                    if input.isEmpty { break }
                }
            }
            let verdict = parse(input)
            switch verdict {
            case .complete(let offset, let length):
                verdicts["complete", default: 0] += 1
                XCTAssertLessThanOrEqual(offset + length, input.count)
                if length > 0 {
                    XCTAssertTrue(input[offset..<(offset + length)].allSatisfy { $0 > 0x20 && $0 < 0x7F }, "\(input)")
                }
            case .needMore(let total):
                verdicts["needMore", default: 0] += 1
                XCTAssertGreaterThan(total, input.count)
            case .invalid: verdicts["invalid", default: 0] += 1
            case .oversize: verdicts["oversize", default: 0] += 1
            }
        }
        XCTAssertEqual(verdicts.values.reduce(0, +), 1_000_000)
        XCTAssertGreaterThan(verdicts["complete", default: 0], 1000, "\(verdicts)")
        XCTAssertGreaterThan(verdicts["invalid", default: 0], 1000, "\(verdicts)")
        XCTAssertGreaterThan(verdicts["needMore", default: 0], 1000, "\(verdicts)")
    }

    func testRoutesMatchExactNamesFirstThenOneLabelWildcards() {
        let routes = ServerNameRoutes(routes: [(["api.example.test"], 1), (["*.example.test"], 2), (["*.deep.example.test"], 3)], defaultCluster: 0)
        func route(_ name: String) -> Int? {
            let bytes = Array(name.utf8)
            return bytes.withUnsafeBytes { routes.cluster(for: $0, offset: 0, length: $0.count) }
        }
        XCTAssertEqual(route("api.example.test"), 1)
        XCTAssertEqual(route("API.Example.TEST"), 1, "case-insensitive")
        XCTAssertEqual(route("www.example.test"), 2)
        XCTAssertEqual(route("x.deep.example.test"), 3)
        XCTAssertNil(route("example.test"), "a wildcard needs one more label")
        XCTAssertNil(route("other.test"))
    }
}
