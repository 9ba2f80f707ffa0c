/// What a check type decided from the bytes so far: passed or failed, and why (the reason
/// is logged on a transition and shown in `/stats`). A check that needs more bytes has no
/// verdict yet (nil).
struct HealthCheckVerdict: Equatable {
    let passed: Bool
    let reason: String

    /// Up to the first bytes of a reply as a quoted string, control bytes escaped, for a
    /// reason.
    static func printable<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
        "\"" + bytes.map { $0 >= 0x20 && $0 < 0x7F ? String(UnicodeScalar($0)) : ($0 == 0x0D ? "\\r" : ($0 == 0x0A ? "\\n" : "\\x" + String($0, radix: 16))) }.joined() + "\""
    }
}
