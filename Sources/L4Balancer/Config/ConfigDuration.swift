/// Durations as written in the config: an integer and a unit, `500ms`, `2s`, `5m`, `1h`
/// (or `0`). Stored as milliseconds, the data plane's resolution.
public struct ConfigDuration: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var milliseconds: Int64

    public init(milliseconds: Int64) { self.milliseconds = milliseconds }
    public static func seconds(_ s: Int64) -> ConfigDuration { ConfigDuration(milliseconds: s * 1000) }
    public static let zero = ConfigDuration(milliseconds: 0)
    /// The longest duration any field takes: 720h (30 days). Timers, deadlines and health
    /// schedules add durations to a monotonic clock and scale them (ejection doubling, up
    /// to 2^20); this bound keeps every such sum far inside Int64 and the workers' 32-bit
    /// tick counts.
    public static let maximum = ConfigDuration(milliseconds: 720 * 3_600_000)

    public static func < (a: ConfigDuration, b: ConfigDuration) -> Bool { a.milliseconds < b.milliseconds }

    public static func parse(_ text: String) -> ConfigDuration? {
        if text == "0" { return .zero }
        let digits = text.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let value = Int64(digits) else { return nil }
        let scale: Int64
        switch text.dropFirst(digits.count) {
        case "ms": scale = 1
        case "s": scale = 1000
        case "m": scale = 60_000
        case "h": scale = 3_600_000
        default: return nil
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: scale)
        return overflow ? nil : ConfigDuration(milliseconds: product)
    }

    public var description: String {
        let ms = milliseconds
        if ms == 0 { return "0s" }
        if ms % 3_600_000 == 0 { return "\(ms / 3_600_000)h" }
        if ms % 60_000 == 0 { return "\(ms / 60_000)m" }
        if ms % 1000 == 0 { return "\(ms / 1000)s" }
        return "\(ms)ms"
    }
}
