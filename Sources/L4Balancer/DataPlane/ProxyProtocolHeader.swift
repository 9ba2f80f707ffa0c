#if canImport(Glibc)
import Glibc
#endif

/// Writes HAProxy's PROXY protocol header (v1 text or v2 binary) that tells the upstream
/// the client's address. Writes into caller memory with `inet_ntop`; no String, no
/// allocation. Addresses are read from the accepted socket (`getpeername`/`getsockname`).
public enum ProxyProtocolHeader {
    /// Longest header written: v1 is at most 107 bytes, v2 with IPv6 52.
    public static let capacity = 112

    /// The v2 signature, `\r\n\r\n\0\r\nQUIT\n`.
    static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// Writes the header for `client` (the accepted socket) into `out`; returns its length.
    public static func write(version: Config.Listener.ProxyProtocol, client fd: Int32, into out: UnsafeMutableRawPointer) -> Int {
        var peer = sockaddr_storage()
        var local = sockaddr_storage()
        var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var localLength = peerLength
        let ok = withUnsafeMutablePointer(to: &peer) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &peerLength) == 0 }
        } && withUnsafeMutablePointer(to: &local) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &localLength) == 0 }
        }
        var source = Endpoint()
        var destination = Endpoint()
        guard ok, source.read(&peer), destination.read(&local), source.isV4 == destination.isV4 else {
            return version == .v1 ? writeV1Unknown(into: out) : writeV2Local(into: out)
        }
        return version == .v1
            ? writeV1(source: source, destination: destination, into: out)
            : writeV2(source: source, destination: destination, into: out)
    }

    /// An address in the form the header needs: 4 or 16 bytes and a port. IPv4-mapped IPv6
    /// addresses are written as IPv4.
    struct Endpoint {
        var bytes: (UInt64, UInt64) = (0, 0)
        var isV4 = true
        var port: UInt16 = 0

        mutating func read(_ storage: inout sockaddr_storage) -> Bool {
            switch Int32(storage.ss_family) {
            case AF_INET:
                let sin = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
                withUnsafeMutableBytes(of: &bytes) { dst in withUnsafeBytes(of: sin.sin_addr) { dst.copyMemory(from: $0) } }
                isV4 = true
                port = UInt16(bigEndian: sin.sin_port)
            case AF_INET6:
                let sin6 = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
                let mapped = withUnsafeBytes(of: sin6.sin6_addr) { raw in
                    raw[0..<10].allSatisfy { $0 == 0 } && raw[10] == 0xFF && raw[11] == 0xFF
                }
                withUnsafeMutableBytes(of: &bytes) { dst in
                    withUnsafeBytes(of: sin6.sin6_addr) { src in
                        if mapped {
                            dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[12..<16]))
                        } else {
                            dst.copyMemory(from: src)
                        }
                    }
                }
                isV4 = mapped
                port = UInt16(bigEndian: sin6.sin6_port)
            default:
                return false
            }
            return true
        }

        var length: Int { isV4 ? 4 : 16 }
    }

    static func writeV1(source: Endpoint, destination: Endpoint, into out: UnsafeMutableRawPointer) -> Int {
        var n = 0
        func put(_ text: StaticString) {
            out.advanced(by: n).copyMemory(from: text.utf8Start, byteCount: text.utf8CodeUnitCount)
            n += text.utf8CodeUnitCount
        }
        func putAddress(_ e: Endpoint) {
            var bytes = e.bytes
            let written = withUnsafeBytes(of: &bytes) { raw -> Int in
                let text = out.advanced(by: n).assumingMemoryBound(to: CChar.self)
                guard inet_ntop(e.isV4 ? AF_INET : AF_INET6, raw.baseAddress, text, socklen_t(INET6_ADDRSTRLEN)) != nil else { return 0 }
                return strlen(text)
            }
            n += written
        }
        func putPort(_ port: UInt16) {
            var digits: (UInt8, UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0, 0)
            var count = 0
            var value = port
            withUnsafeMutableBytes(of: &digits) { d in
                repeat {
                    d[count] = UInt8(48 + value % 10)
                    value /= 10
                    count += 1
                } while value > 0
                for i in 0..<count { out.storeBytes(of: d[count - 1 - i], toByteOffset: n + i, as: UInt8.self) }
            }
            n += count
        }
        put(source.isV4 ? "PROXY TCP4 " : "PROXY TCP6 ")
        putAddress(source)
        put(" ")
        putAddress(destination)
        put(" ")
        putPort(source.port)
        put(" ")
        putPort(destination.port)
        put("\r\n")
        return n
    }

    static func writeV1Unknown(into out: UnsafeMutableRawPointer) -> Int {
        let text: StaticString = "PROXY UNKNOWN\r\n"
        out.copyMemory(from: text.utf8Start, byteCount: text.utf8CodeUnitCount)
        return text.utf8CodeUnitCount
    }

    static func writeV2(source: Endpoint, destination: Endpoint, into out: UnsafeMutableRawPointer) -> Int {
        v2Signature.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: 12) }
        out.storeBytes(of: 0x21, toByteOffset: 12, as: UInt8.self)  // version 2, PROXY
        out.storeBytes(of: source.isV4 ? 0x11 : 0x21, toByteOffset: 13, as: UInt8.self)  // INET/INET6 + STREAM
        let addressLength = source.length * 2 + 4
        out.storeBytes(of: UInt16(addressLength).bigEndian, toByteOffset: 14, as: UInt16.self)
        var s = source.bytes
        var d = destination.bytes
        withUnsafeBytes(of: &s) { out.advanced(by: 16).copyMemory(from: $0.baseAddress!, byteCount: source.length) }
        withUnsafeBytes(of: &d) { out.advanced(by: 16 + source.length).copyMemory(from: $0.baseAddress!, byteCount: source.length) }
        out.storeBytes(of: source.port.bigEndian, toByteOffset: 16 + 2 * source.length, as: UInt16.self)
        out.storeBytes(of: destination.port.bigEndian, toByteOffset: 18 + 2 * source.length, as: UInt16.self)
        return 16 + addressLength
    }

    /// v2 LOCAL command: the upstream uses the connection's own addresses.
    static func writeV2Local(into out: UnsafeMutableRawPointer) -> Int {
        v2Signature.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: 12) }
        out.storeBytes(of: 0x20, toByteOffset: 12, as: UInt8.self)
        out.storeBytes(of: 0x00, toByteOffset: 13, as: UInt8.self)
        out.storeBytes(of: UInt16(0), toByteOffset: 14, as: UInt16.self)
        return 16
    }
}
