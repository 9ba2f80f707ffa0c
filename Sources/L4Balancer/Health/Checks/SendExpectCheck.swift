/// `type: send_expect` (tcp or udp): the check sends `send` and the reply must start with
/// `expect`.
enum SendExpectCheck {
    /// Fails as soon as a byte differs; over a stream, a close before `expect` is complete
    /// fails; a datagram shorter than `expect` fails.
    static func verdict(_ got: [UInt8], expect: [UInt8], eof: Bool, datagram: Bool) -> HealthCheckVerdict? {
        if got.count >= expect.count {
            let passed = Array(got.prefix(expect.count)) == expect
            return HealthCheckVerdict(passed: passed, reason: passed ? "expected reply" : "unexpected reply \(HealthCheckVerdict.printable(got.prefix(32)))")
        }
        if got != Array(expect.prefix(got.count)) {
            return HealthCheckVerdict(passed: false, reason: "unexpected reply \(HealthCheckVerdict.printable(got.prefix(32)))")
        }
        if eof {
            return HealthCheckVerdict(passed: false, reason: datagram ? "a reply of \(got.count) bytes, shorter than expected" : "connection closed after \(got.count) bytes")
        }
        return nil
    }
}
