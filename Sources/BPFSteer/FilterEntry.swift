#if canImport(Glibc)
import Glibc
#endif

/// A source prefix: `192.0.2.0/24`, `2001:db8::/32`; a bare address is /32 or /128.
/// Stored masked, so `192.0.2.7/24` and `192.0.2.0/24` are the same entry.
public struct SourcePrefix: Hashable, Sendable, CustomStringConvertible {
    public enum Family: Sendable { case v4, v6 }
    public let family: Family
    /// The address in network byte order: 4 bytes for IPv4, 16 for IPv6.
    public let bytes: [UInt8]
    public let length: Int

    public init(family: Family, bytes: [UInt8], length: Int) {
        self.family = family
        self.length = length
        self.bytes = SourcePrefix.masked(bytes, length)
    }

    /// Parses `ADDRESS[/LENGTH]`, or says what is wrong with it.
    public static func parse(_ text: String) -> Result<SourcePrefix, FilterEntryError> {
        // inet_pton reads a C string: a NUL (or any control character) would end the
        // address early and let "127.0.0.2\0junk" stand for 127.0.0.2.
        if let complaint = text.controlCharacterComplaint { return .failure(FilterEntryError(complaint)) }
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        let address = String(parts[0])
        var storage = [UInt8](repeating: 0, count: 16)
        let family: Family
        if inet_pton(AF_INET, address, &storage) == 1 {
            family = .v4
        } else if inet_pton(AF_INET6, address, &storage) == 1 {
            family = .v6
        } else {
            return .failure(FilterEntryError("'\(text)' is not an IP address or CIDR prefix"))
        }
        let width = family == .v4 ? 32 : 128
        var length = width
        if parts.count == 2 {
            guard let n = Int(parts[1]), (0...width).contains(n) else {
                return .failure(FilterEntryError("'\(text)': prefix length must be 0-\(width)"))
            }
            length = n
        }
        return .success(SourcePrefix(family: family, bytes: Array(storage.prefix(width / 8)), length: length))
    }

    /// True when `address` (network byte order, this prefix's family) is inside it.
    public func contains(_ address: UnsafeRawBufferPointer) -> Bool {
        var remaining = length
        var index = 0
        while remaining >= 8 {
            if address[index] != bytes[index] { return false }
            remaining -= 8
            index += 1
        }
        if remaining == 0 { return true }
        let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - remaining))
        return address[index] & mask == bytes[index]
    }

    public var description: String {
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        bytes.withUnsafeBytes { _ = inet_ntop(family == .v4 ? AF_INET : AF_INET6, $0.baseAddress, &text, socklen_t(text.count)) }
        return "\(String(cString: text))/\(length)"
    }

    static func masked(_ bytes: [UInt8], _ length: Int) -> [UInt8] {
        var result = bytes
        for i in result.indices {
            let bitsHere = max(0, min(8, length - i * 8))
            result[i] &= bitsHere == 0 ? 0 : UInt8(truncatingIfNeeded: 0xFF << (8 - bitsHere))
        }
        return result
    }
}

/// `tcp/PORT` or `udp/PORT`: packets to that destination port, for that protocol only.
public struct PortRule: Hashable, Sendable, CustomStringConvertible {
    public enum TransportProtocol: String, Sendable { case tcp, udp }
    public let transport: TransportProtocol
    public let port: UInt16

    public init(_ transport: TransportProtocol, _ port: UInt16) {
        self.transport = transport
        self.port = port
    }

    public var description: String { "\(transport.rawValue)/\(port)" }
}

/// One entry of the blocklist, in the CLI's and the config's syntax.
public enum FilterEntry: Hashable, Sendable, CustomStringConvertible {
    case source(SourcePrefix)
    case port(PortRule)

    public static func parse(_ text: String) -> Result<FilterEntry, FilterEntryError> {
        if let complaint = text.controlCharacterComplaint { return .failure(FilterEntryError(complaint)) }
        let trimmed = text.trimmingSpaces
        for transport in [PortRule.TransportProtocol.tcp, .udp] where trimmed.hasPrefix(transport.rawValue + "/") {
            let number = trimmed.dropFirst(transport.rawValue.count + 1)
            guard let port = Int(number), (1...65535).contains(port) else {
                return .failure(FilterEntryError("'\(text)': port must be 1-65535"))
            }
            return .success(.port(PortRule(transport, UInt16(port))))
        }
        return SourcePrefix.parse(trimmed).map { .source($0) }
    }

    public var description: String {
        switch self {
        case .source(let prefix): prefix.description
        case .port(let rule): rule.description
        }
    }
}

public struct FilterEntryError: Error, Equatable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Who put an entry in the lists: the config file, a run-time `block add`, or both.
/// Pinned with the entry, so `block list` can say where each came from after a restart.
public struct FilterOrigin: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let config = FilterOrigin(rawValue: 1 << 0)
    public static let runtime = FilterOrigin(rawValue: 1 << 1)

    public var names: [String] {
        var names: [String] = []
        if contains(.config) { names.append("config") }
        if contains(.runtime) { names.append("runtime") }
        return names
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}

extension StringProtocol {
    /// The first control character (NUL, newline, DEL, …) as `U+0000`, or nil. Addresses,
    /// names and entries never hold one; C functions would stop reading at a NUL.
    public var firstControlCharacter: String? {
        // General category Cc is exactly C0, DEL and C1 (U+0000–U+001F, U+007F–U+009F): a range
        // test, not a Unicode property lookup per scalar (this runs on every discovered address).
        guard let scalar = unicodeScalars.first(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) }) else { return nil }
        let hex = String(scalar.value, radix: 16, uppercase: true)
        return "U+" + String(repeating: "0", count: Swift.max(0, 4 - hex.count)) + hex
    }

    /// `"…" contains a control character (U+0000)`, the one wording every refusal uses; nil
    /// when there is none.
    public var controlCharacterComplaint: String? {
        firstControlCharacter.map { "\(String(self).debugDescription) contains a control character (\($0))" }
    }
}
