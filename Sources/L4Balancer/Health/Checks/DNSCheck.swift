/// `type: dns` (udp or tcp): a query for `query`/`type`; the answer's RCODE must be one of
/// `rcodes`. Over TCP the message carries its two-byte length.
enum DNSCheck {
    static func request(query: String, type: UInt16, stream: Bool) -> [UInt8] {
        let message = DNSQuery.message(query: query, type: type)
        return stream ? [UInt8(message.count >> 8), UInt8(message.count & 0xFF)] + message : message
    }

    static func verdict(_ got: [UInt8], id: UInt16, rcodes: [UInt8], stream: Bool, eof: Bool) -> HealthCheckVerdict? {
        switch DNSQuery.judge(got, id: id, stream: stream) {
        case .answer(let rcode): return HealthCheckVerdict(passed: rcodes.contains(rcode), reason: "DNS \(DNSQuery.rcodeName(rcode))")
        case .invalid(let why): return HealthCheckVerdict(passed: false, reason: why)
        case .incomplete: return eof ? HealthCheckVerdict(passed: false, reason: "connection closed after \(got.count) bytes") : nil
        }
    }
}
