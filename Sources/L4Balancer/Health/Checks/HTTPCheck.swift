/// `type: http`: `GET path` with `Connection: close`; the status line's code must be in
/// `expected_statuses`.
enum HTTPCheck {
    static func request(path: String, host: String) -> [UInt8] {
        Array("GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUser-Agent: l4lb-health-check\r\nConnection: close\r\n\r\n".utf8)
    }

    /// Decided by the status line; no line within 8 KiB, or a close before one, fails.
    static func verdict(_ got: [UInt8], statuses: ClosedRange<Int>, eof: Bool) -> HealthCheckVerdict? {
        if let lineEnd = got.firstIndex(of: 0x0A) {
            let line = String(decoding: got[..<lineEnd], as: UTF8.self)
            let parts = line.split(separator: " ")
            if parts.count >= 2, parts[0].hasPrefix("HTTP/"), let code = Int(parts[1]) {
                return HealthCheckVerdict(passed: statuses.contains(code), reason: "HTTP \(code)")
            }
            return HealthCheckVerdict(passed: false, reason: "not an HTTP response: \(HealthCheckVerdict.printable(got.prefix(32)))")
        }
        if eof || got.count > 8192 { return HealthCheckVerdict(passed: false, reason: "no HTTP status line") }
        return nil
    }
}
