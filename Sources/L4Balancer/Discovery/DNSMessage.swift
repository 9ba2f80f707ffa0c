/// DNS messages for endpoint discovery (issue 36): a query offering EDNS0 (RFC 6891) and the
/// answer section of a reply — A, AAAA and SRV (RFC 2782) records with their TTLs, names
/// followed through compression pointers (RFC 1035 §4.1.4). Control plane only.
public enum DNSMessage {
    public static let typeA: UInt16 = 1, typeAAAA: UInt16 = 28, typeSRV: UInt16 = 33, typeOPT: UInt16 = 41

    /// The UDP payload size offered with EDNS0: the DNS flag day 2020 default, which fits an
    /// IPv6 packet on any link without fragments. Larger answers come truncated, then by TCP.
    public static let ednsPayloadSize: UInt16 = 1232

    public struct Record: Equatable, Sendable {
        public enum Data: Equatable, Sendable {
            /// A (4 bytes) or AAAA (16 bytes).
            case address([UInt8])
            case service(priority: UInt16, weight: UInt16, port: UInt16, target: String)
            /// Any other type (a CNAME on the way, say): skipped by discovery.
            case other
        }

        public let name: String
        public let type: UInt16
        public let ttl: UInt32
        public let data: Data

        public init(name: String, type: UInt16, ttl: UInt32, data: Data) {
            self.name = name
            self.type = type
            self.ttl = ttl
            self.data = data
        }
    }

    public struct Answer: Equatable, Sendable {
        public init(id: UInt16, rcode: UInt8, truncated: Bool, records: [Record]) {
            self.id = id
            self.rcode = rcode
            self.truncated = truncated
            self.records = records
        }

        public let id: UInt16
        public let rcode: UInt8
        /// TC: the answer did not fit; ask again over TCP.
        public let truncated: Bool
        /// The answer section.
        public let records: [Record]
    }

    public struct ParseError: Error, Equatable, CustomStringConvertible {
        public let description: String
    }

    /// A recursive query for `name` of `type`, with an OPT record offering `udpSize`; nil if
    /// `name` is not a valid name.
    public static func query(id: UInt16, name: String, type: UInt16, udpSize: UInt16 = ednsPayloadSize) -> [UInt8]? {
        guard let encoded = DNSQuery.encodeName(name) else { return nil }
        var out: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]
        out += encoded
        out += [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
        // OPT: root name, type 41, class = payload size, TTL 0 (extended rcode, version, flags), no options.
        out += [0, UInt8(typeOPT >> 8), UInt8(typeOPT & 0xFF), UInt8(udpSize >> 8), UInt8(udpSize & 0xFF), 0, 0, 0, 0, 0, 0]
        return out
    }

    /// The header and answer section of `message` (without TCP's length prefix).
    public static func parse(_ message: [UInt8]) throws(ParseError) -> Answer {
        var reader = Reader(bytes: message)
        let id = try reader.u16()
        let flags = try reader.u16()
        guard flags & 0x8000 != 0 else { throw ParseError(description: "a DNS query, not an answer") }
        let questions = try reader.u16(), answers = try reader.u16()
        _ = try reader.u16()
        _ = try reader.u16()
        for _ in 0..<questions {
            _ = try reader.name()
            try reader.skip(4)
        }
        var records: [Record] = []
        records.reserveCapacity(min(Int(answers), message.count / 11))
        for _ in 0..<answers {
            let name = try reader.name()
            let type = try reader.u16()
            _ = try reader.u16()
            let ttl = try reader.u32()
            let length = Int(try reader.u16())
            let end = reader.offset + length
            guard end <= message.count else { throw ParseError(description: "a record's data runs past the message") }
            let data: Record.Data
            switch type {
            case typeA, typeAAAA:
                guard length == (type == typeA ? 4 : 16) else { throw ParseError(description: "an address record of \(length) bytes") }
                data = .address(Array(message[reader.offset..<end]))
            case typeSRV:
                guard length >= 7 else { throw ParseError(description: "an SRV record of \(length) bytes") }
                let priority = try reader.u16(), weight = try reader.u16(), port = try reader.u16()
                let target = try reader.name()
                guard reader.offset == end else { throw ParseError(description: "an SRV record's target does not end its data") }
                data = .service(priority: priority, weight: weight, port: port, target: target)
            default:
                data = .other
            }
            reader.offset = end
            records.append(Record(name: name, type: type, ttl: ttl, data: data))
        }
        return Answer(id: id, rcode: UInt8(flags & 0x000F), truncated: flags & 0x0200 != 0, records: records)
    }

    /// Reads big-endian fields and names, never past the message.
    private struct Reader {
        let bytes: [UInt8]
        var offset = 0

        mutating func skip(_ count: Int) throws(ParseError) {
            guard offset + count <= bytes.count else { throw ParseError(description: "the message ends early (\(bytes.count) bytes)") }
            offset += count
        }

        mutating func u16() throws(ParseError) -> UInt16 {
            try skip(2)
            return UInt16(bytes[offset - 2]) << 8 | UInt16(bytes[offset - 1])
        }

        mutating func u32() throws(ParseError) -> UInt32 {
            UInt32(try u16()) << 16 | UInt32(try u16())
        }

        /// A name at the offset, lower-cased, without the trailing dot; follows compression
        /// pointers (backwards only, at most 64 of them: no loop).
        mutating func name() throws(ParseError) -> String {
            var labels: [String] = []
            var at = offset, jumps = 0, length = 0
            var resume: Int?
            while true {
                guard at < bytes.count else { throw ParseError(description: "a name runs past the message") }
                let size = Int(bytes[at])
                if size & 0xC0 == 0xC0 {
                    guard at + 1 < bytes.count else { throw ParseError(description: "a compression pointer runs past the message") }
                    let target = (size & 0x3F) << 8 | Int(bytes[at + 1])
                    jumps += 1
                    guard target < at, jumps <= 64 else { throw ParseError(description: "a compression pointer that does not point back") }
                    if resume == nil { resume = at + 2 }
                    at = target
                    continue
                }
                guard size & 0xC0 == 0 else { throw ParseError(description: "a label of unknown kind \(size >> 6)") }
                if size == 0 {
                    offset = resume ?? at + 1
                    return labels.joined(separator: ".")
                }
                guard at + 1 + size <= bytes.count else { throw ParseError(description: "a label runs past the message") }
                length += size + 1
                guard length + 1 <= 255 else { throw ParseError(description: "a name longer than 255 bytes") }
                labels.append(String(decoding: bytes[(at + 1)...(at + size)], as: UTF8.self).lowercased())
                at += 1 + size
            }
        }
    }
}
