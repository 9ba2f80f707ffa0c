import Foundation
import L4Balancer
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The PROXY protocol header l4lb sends upstream, written from a real accepted socket's
/// addresses, byte for byte as HAProxy's spec (proxy-protocol.txt) gives it.
final class ProxyProtocolHeaderTests: XCTestCase {
    /// A connected pair over loopback: the accepted socket, the client's port, the
    /// listener's port. `v6`: over ::1.
    func acceptedSocket(v6: Bool) throws -> (accepted: Int32, clientPort: UInt16, listenerPort: UInt16, close: () -> Void) {
        let family = v6 ? AF_INET6 : AF_INET
        let listener = socket(family, Int32(SOCK_STREAM.rawValue), 0)
        var storage = sockaddr_storage()
        var length: socklen_t
        if v6 {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_addr = in6addr_loopback
            withUnsafeBytes(of: a) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            withUnsafeBytes(of: a) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        XCTAssertEqual(bound, 0)
        XCTAssertEqual(listen(listener, 4), 0)
        var actual = sockaddr_storage()
        var actualLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &actual) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &actualLength) } }
        let client = socket(family, Int32(SOCK_STREAM.rawValue), 0)
        let connected = withUnsafePointer(to: &actual) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, actualLength) } }
        XCTAssertEqual(connected, 0)
        let accepted = accept(listener, nil, nil)
        XCTAssertGreaterThanOrEqual(accepted, 0)
        func port(_ fd: Int32, peer: Bool) -> UInt16 {
            var s = sockaddr_storage()
            var l = socklen_t(MemoryLayout<sockaddr_storage>.size)
            _ = withUnsafeMutablePointer(to: &s) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { peer ? getpeername(fd, $0, &l) : getsockname(fd, $0, &l) } }
            return withUnsafeBytes(of: s) { UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self)) }
        }
        return (accepted, port(accepted, peer: true), port(accepted, peer: false), { Glibc.close(accepted); Glibc.close(client); Glibc.close(listener) })
    }

    func header(_ version: Config.Listener.ProxyProtocol, fd: Int32) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: ProxyProtocolHeader.capacity)
        let n = out.withUnsafeMutableBytes { ProxyProtocolHeader.write(version: version, client: fd, into: $0.baseAddress!) }
        return Array(out[0..<n])
    }

    func testV1OverIPv4AndIPv6() throws {
        let four = try acceptedSocket(v6: false)
        defer { four.close() }
        XCTAssertEqual(String(decoding: header(.v1, fd: four.accepted), as: UTF8.self),
                       "PROXY TCP4 127.0.0.1 127.0.0.1 \(four.clientPort) \(four.listenerPort)\r\n")
        let six = try acceptedSocket(v6: true)
        defer { six.close() }
        XCTAssertEqual(String(decoding: header(.v1, fd: six.accepted), as: UTF8.self),
                       "PROXY TCP6 ::1 ::1 \(six.clientPort) \(six.listenerPort)\r\n")
    }

    func testV2OverIPv4AndIPv6() throws {
        let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
        func port(_ p: UInt16) -> [UInt8] { [UInt8(p >> 8), UInt8(p & 0xFF)] }
        let four = try acceptedSocket(v6: false)
        defer { four.close() }
        XCTAssertEqual(header(.v2, fd: four.accepted),
                       signature + [0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 1] + port(four.clientPort) + port(four.listenerPort))
        let six = try acceptedSocket(v6: true)
        defer { six.close() }
        let loopback = [UInt8](repeating: 0, count: 15) + [1]
        XCTAssertEqual(header(.v2, fd: six.accepted),
                       signature + [0x21, 0x21, 0, 36] + loopback + loopback + port(six.clientPort) + port(six.listenerPort))
    }

    /// A socket whose addresses cannot be read: v1 says UNKNOWN, v2 sends LOCAL (the
    /// upstream then uses the connection's own addresses).
    func testUnknownAddressesFallBack() {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        XCTAssertEqual(String(decoding: header(.v1, fd: fd), as: UTF8.self), "PROXY UNKNOWN\r\n")
        XCTAssertEqual(header(.v2, fd: fd), [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0, 0])
    }
}
