/// The `dns` health check's messages (RFC 1035 §4): one query with recursion desired, and
/// the header fields of the answer that decide it. Over TCP the message has a two-byte
/// length in front (§4.2.2).
public enum DNSQuery {
    public static let types: [String: UInt16] = [
        "A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255,
    ]
    public static let rcodes: [String: UInt8] = [
        "NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5,
    ]

    /// `name` in wire form (length-prefixed labels, then the root), or nil if it is not a
    /// valid name.
    public static func encodeName(_ name: String) -> [UInt8]? {
        let trimmed = name.hasSuffix(".") ? String(name.dropLast()) : name
        var out: [UInt8] = []
        if !trimmed.isEmpty {
            for label in trimmed.split(separator: ".", omittingEmptySubsequences: false) {
                let bytes = Array(label.utf8)
                guard (1...63).contains(bytes.count) else { return nil }
                out.append(UInt8(bytes.count))
                out += bytes
            }
        }
        out.append(0)
        return out.count <= 255 ? out : nil
    }

    /// The query message with ID 0 (the checker sets a fresh ID per check).
    public static func message(query: String, type: UInt16) -> [UInt8] {
        var out: [UInt8] = [0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        out += encodeName(query) ?? [0]
        out += [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
        return out
    }

    public enum Verdict: Equatable {
        case incomplete
        case answer(rcode: UInt8)
        case invalid(String)
    }

    /// Reads the answer to the query with `id`: `stream` when it came over TCP.
    public static func judge(_ bytes: [UInt8], id: UInt16, stream: Bool) -> Verdict {
        var message = bytes[...]
        if stream {
            guard bytes.count >= 2 else { return .incomplete }
            let length = Int(bytes[0]) << 8 | Int(bytes[1])
            guard bytes.count >= 2 + length else { return .incomplete }
            message = bytes[2..<(2 + length)]
        }
        guard message.count >= 12 else { return stream ? .invalid("a DNS message of \(message.count) bytes") : .invalid("a reply of \(message.count) bytes, not DNS") }
        let base = message.startIndex
        let answerID = UInt16(message[base]) << 8 | UInt16(message[base + 1])
        guard answerID == id else { return .invalid("a DNS answer with ID \(answerID), expected \(id)") }
        guard message[base + 2] & 0x80 != 0 else { return .invalid("a DNS query, not an answer") }
        return .answer(rcode: message[base + 3] & 0x0F)
    }

    public static func rcodeName(_ code: UInt8) -> String {
        rcodes.first { $0.value == code }?.key ?? "rcode \(code)"
    }
}
