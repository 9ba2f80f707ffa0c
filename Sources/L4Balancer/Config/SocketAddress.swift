import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 or IPv6 address with a port, as written in the config (`ip:port`, `[v6]:port`).
public struct SocketAddress: Sendable, Hashable, CustomStringConvertible {
    public enum Family: Sendable { case inet, inet6 }

    /// Address bytes in network order (4 or 16).
    public let ip: [UInt8]
    public let port: UInt16

    public var family: Family { ip.count == 4 ? .inet : .inet6 }

    /// 127.0.0.0/8, ::1, or an IPv4-mapped loopback address.
    public var isLoopback: Bool {
        if ip.count == 4 { return ip[0] == 127 }
        if ip == [UInt8](repeating: 0, count: 15) + [1] { return true }
        return ip.prefix(12) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF][...] && ip[12] == 127
    }

    public init(ip: [UInt8], port: UInt16) {
        precondition(ip.count == 4 || ip.count == 16)
        self.ip = ip
        self.port = port
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case shape(String)
        case port(String)
        case ip(String)
        case control(String)

        public var description: String {
            switch self {
            case .shape(let text): return "expected ip:port or [ipv6]:port, got \"\(text)\""
            case .port(let text): return text
            case .ip(let text): return "invalid IP address \"\(text)\""
            case .control(let complaint): return complaint
            }
        }
    }

    /// Parses `ip:port` or `[ipv6]:port`.
    public static func parse(_ text: String) -> Result<SocketAddress, ParseError> {
        // inet_pton stops at a NUL: "127.0.0.1\0evil:80" must not read as 127.0.0.1.
        if let complaint = text.controlCharacterComplaint { return .failure(.control(complaint)) }
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"),
                  text.index(after: close) < text.endIndex, text[text.index(after: close)] == ":"
            else { return .failure(.shape(text)) }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else {
                return .failure(.shape(text))
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !portText.isEmpty, portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber) else {
            return .failure(.port("invalid port \"\(portText)\""))
        }
        guard let port = Int(portText), port >= 1, port <= 65535 else {
            return .failure(.port("port \(portText) out of range"))
        }
        guard let ip = parseIP(String(host)) else { return .failure(.ip(String(host))) }
        return .success(SocketAddress(ip: ip, port: UInt16(port)))
    }

    /// Parses a bare IPv4 or IPv6 address into network-order bytes.
    public static func parseIP(_ text: String) -> [UInt8]? {
        guard text.firstControlCharacter == nil else { return nil }
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: v4) { Array($0) }
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            return withUnsafeBytes(of: v6) { Array($0) }
        }
        return nil
    }

    public var ipString: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        ip.withUnsafeBytes { bytes in
            _ = inet_ntop(family == .inet ? AF_INET : AF_INET6, bytes.baseAddress, &buffer, socklen_t(buffer.count))
        }
        return String(cString: buffer)
    }

    public var description: String {
        family == .inet ? "\(ipString):\(port)" : "[\(ipString)]:\(port)"
    }

    /// Writes the `sockaddr_in`/`sockaddr_in6` form into `storage`; returns its length.
    public func write(to storage: UnsafeMutablePointer<sockaddr_storage>) -> socklen_t {
        let raw = UnsafeMutableRawPointer(storage)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<sockaddr_storage>.size)
        switch family {
        case .inet:
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin.sin_addr) { $0.copyBytes(from: ip) }
            raw.storeBytes(of: sin, as: sockaddr_in.self)
            return socklen_t(MemoryLayout<sockaddr_in>.size)
        case .inet6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { $0.copyBytes(from: ip) }
            raw.storeBytes(of: sin6, as: sockaddr_in6.self)
            return socklen_t(MemoryLayout<sockaddr_in6>.size)
        }
    }

    /// Reads a `sockaddr_in`/`sockaddr_in6`; nil for other families.
    public init?(storage: UnsafePointer<sockaddr_storage>) {
        let raw = UnsafeRawPointer(storage)
        switch Int32(storage.pointee.ss_family) {
        case AF_INET:
            let sin = raw.load(as: sockaddr_in.self)
            self.init(ip: withUnsafeBytes(of: sin.sin_addr) { Array($0) }, port: UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = raw.load(as: sockaddr_in6.self)
            self.init(ip: withUnsafeBytes(of: sin6.sin6_addr) { Array($0) }, port: UInt16(bigEndian: sin6.sin6_port))
        default:
            return nil
        }
    }
}
