import Foundation
import Glibc
import URing
import XCTest

/// UDP through the ring as the UDP data plane will use it: multishot recvmsg into provided
/// buffers (one completion per datagram, its sender's address beside the payload) and
/// sendmsg replies to that address.
final class DatagramTests: XCTestCase {
    var completions = UnsafeMutableBufferPointer<Completion>.allocate(capacity: 64)

    deinit { completions.deallocate() }

    func next(_ ring: borrowing Ring) throws -> Completion {
        while true {
            try ring.submitAndWait(minimum: 1)
            if ring.reap(into: completions) > 0 { return completions[0] }
        }
    }

    func udpSocket() throws -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var size = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, size) == 0 && getsockname(fd, $0, &size) == 0 }
        }
        XCTAssertTrue(bound)
        var buffer: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer, 4)
        return (fd, UInt16(bigEndian: address.sin_port))
    }

    /// Datagrams of every size a UDP payload can have arrive whole, one per completion,
    /// with the sender's address; a reply sent to that address reaches the sender intact.
    func testMultishotReceiveMessageKeepsBoundariesAndSenders() throws {
        let ring = try Ring(entries: 64)
        let nameLength = MemoryLayout<sockaddr_in6>.size
        let bufferSize = 65_536 + ReceivedMessage.headerBytes(nameLength: nameLength)
        var buffers = try ProvidedBufferRing(ring: ring, group: 7, count: 8, bufferSize: bufferSize)
        defer { buffers.unregister(from: ring) }
        let (server, serverPort) = try udpSocket()
        let (client, clientPort) = try udpSocket()
        defer { close(server); close(client) }
        let header = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)
        defer { header.deallocate() }
        header.initialize(to: msghdr())
        header.pointee.msg_namelen = socklen_t(nameLength)
        XCTAssertTrue(ring.prepareMultishotReceiveMessage(socket: server, message: header, bufferGroup: 7, userData: 1))

        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = serverPort.bigEndian
        target.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var random = SystemRandomNumberGenerator()
        for size in [1, 512, 1472, 9000, 65_507, 3] {
            let payload = (0..<size).map { _ in UInt8.random(in: 0...255, using: &random) }
            let sent = withUnsafePointer(to: &target) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(client, payload, size, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            XCTAssertEqual(sent, size)
            let c = try next(ring)
            XCTAssertEqual(c.userData, 1)
            XCTAssertTrue(c.hasMore, "the multishot receive ended after a \(size)-byte datagram")
            let id = try XCTUnwrap(c.bufferID)
            buffers.handedOut()
            let message = try XCTUnwrap(ReceivedMessage(buffer: buffers.address(of: id), length: c.result, message: header))
            XCTAssertFalse(message.truncated)
            XCTAssertEqual(message.payloadLength, size)
            XCTAssertTrue(payload.withUnsafeBytes { $0.elementsEqual(UnsafeRawBufferPointer(start: message.payload, count: size)) }, "\(size) bytes differ")
            let sender = message.name.load(as: sockaddr_in.self)
            XCTAssertEqual(Int32(sender.sin_family), AF_INET)
            XCTAssertEqual(UInt16(bigEndian: sender.sin_port), clientPort)

            // The reply: sendmsg from the server socket to the address that came with it,
            // straight out of the same buffer.
            var iov = iovec(iov_base: message.payload, iov_len: size)
            var reply = msghdr()
            reply.msg_name = message.name
            reply.msg_namelen = socklen_t(message.nameLength)
            try withUnsafeMutablePointer(to: &iov) { iovPointer in
                reply.msg_iov = iovPointer
                reply.msg_iovlen = 1
                try withUnsafePointer(to: &reply) { replyPointer in
                    XCTAssertTrue(ring.prepareSendMessage(socket: server, message: replyPointer, userData: 2))
                    XCTAssertEqual(try next(ring).result, Int32(size))
                }
            }
            buffers.recycle(id)
            _ = buffers.publish()
            var echoed = [UInt8](repeating: 0, count: 65_536)
            XCTAssertEqual(recv(client, &echoed, echoed.count, 0), size)
            XCTAssertEqual(Array(echoed[..<size]), payload)
        }
    }

    /// A datagram longer than the buffer is flagged truncated, never merged with the next.
    func testADatagramLargerThanTheBufferIsFlaggedTruncated() throws {
        let ring = try Ring(entries: 16)
        let nameLength = MemoryLayout<sockaddr_in6>.size
        var buffers = try ProvidedBufferRing(ring: ring, group: 8, count: 4, bufferSize: 4096)
        defer { buffers.unregister(from: ring) }
        let (server, serverPort) = try udpSocket()
        let (client, _) = try udpSocket()
        defer { close(server); close(client) }
        let header = UnsafeMutablePointer<msghdr>.allocate(capacity: 1)
        defer { header.deallocate() }
        header.initialize(to: msghdr())
        header.pointee.msg_namelen = socklen_t(nameLength)
        ring.prepareMultishotReceiveMessage(socket: server, message: header, bufferGroup: 8, userData: 1)
        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = serverPort.bigEndian
        target.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        for size in [9000, 100] {
            let payload = [UInt8](repeating: UInt8(size & 0xFF), count: size)
            _ = withUnsafePointer(to: &target) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(client, payload, size, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            let c = try next(ring)
            let id = try XCTUnwrap(c.bufferID)
            buffers.handedOut()
            let message = try XCTUnwrap(ReceivedMessage(buffer: buffers.address(of: id), length: c.result, message: header))
            XCTAssertEqual(message.truncated, size == 9000)
            XCTAssertEqual(message.payloadLength, min(size, 4096 - ReceivedMessage.headerBytes(nameLength: nameLength)))
            buffers.recycle(id)
            _ = buffers.publish()
        }
    }
}
