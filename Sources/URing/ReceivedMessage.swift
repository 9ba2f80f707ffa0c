import CURing

#if canImport(Glibc)
import Glibc
#endif

/// One datagram as multishot recvmsg lays it out in a provided buffer: a header
/// (`io_uring_recvmsg_out`), the sender's address in the `msg_namelen` bytes the request
/// reserved, control data, then the payload. A view, no copy: valid until the buffer is
/// recycled.
public struct ReceivedMessage {
    /// The sender's address (`sockaddr_in` or `sockaddr_in6`), `nameLength` bytes.
    public let name: UnsafeMutableRawPointer
    public let nameLength: Int
    public let payload: UnsafeMutableRawPointer
    public let payloadLength: Int
    /// The datagram was longer than the buffer: `payload` holds only its start.
    public let truncated: Bool
    /// The address the datagram was sent to, when the socket asked for it (IP_PKTINFO,
    /// IPV6_RECVPKTINFO: a listener bound to a wildcard address).
    public let destination: PacketDestination?

    /// `length` is the completion's result; `message` the msghdr the request was made with.
    public init?(buffer: UnsafeMutableRawPointer, length: Int32, message: UnsafeMutablePointer<msghdr>) {
        guard let out = io_uring_recvmsg_validate(buffer, length, message) else { return nil }
        name = UnsafeMutableRawPointer(io_uring_recvmsg_name(out))
        nameLength = Int(min(out.pointee.namelen, UInt32(message.pointee.msg_namelen)))
        payload = io_uring_recvmsg_payload(out, message)
        payloadLength = Int(io_uring_recvmsg_payload_length(out, length, message))
        truncated = out.pointee.flags & UInt32(MSG_TRUNC) != 0
        var found: PacketDestination?
        if out.pointee.controllen > 0 {
            var header = io_uring_recvmsg_cmsg_firsthdr(out, message)
            while let h = header, found == nil {
                found = PacketDestination(h)
                header = io_uring_recvmsg_cmsg_nexthdr(out, message, h)
            }
        }
        destination = found
    }

    /// Bytes a provided buffer needs beyond the payload for a request reserving
    /// `nameLength` bytes of address and `controlLength` of control data.
    public static func headerBytes(nameLength: Int, controlLength: Int = 0) -> Int {
        MemoryLayout<io_uring_recvmsg_out>.size + nameLength + controlLength
    }
}

/// A datagram's destination address as the kernel reports it in IP_PKTINFO or
/// IPV6_PKTINFO, and as a reply's source goes back in the same control message.
public struct PacketDestination: Sendable, Equatable {
    public var family: Int32
    /// The address: 4 bytes (IPv4) or 16 (IPv6).
    public var address: (UInt64, UInt64)
    public var interface: UInt32

    /// Room a reply's control data needs for either family.
    public static let controlSpace = 40

    init?(_ header: UnsafeMutablePointer<cmsghdr>) {
        let data = UnsafeMutableRawPointer(header) + MemoryLayout<cmsghdr>.size
        switch (header.pointee.cmsg_level, header.pointee.cmsg_type) {
        case (Int32(IPPROTO_IP), Int32(IP_PKTINFO)):
            let info = data.loadUnaligned(as: in_pktinfo.self)
            family = AF_INET
            // The local address the kernel would answer from (the destination, unless that
            // was a broadcast or multicast address).
            address = (UInt64(info.ipi_spec_dst.s_addr), 0)
            interface = UInt32(bitPattern: info.ipi_ifindex)
        case (Int32(IPPROTO_IPV6), Int32(IPV6_PKTINFO)):
            let info = data.loadUnaligned(as: IPv6PacketInfo.self)
            family = AF_INET6
            address = withUnsafeBytes(of: info.ipi6_addr) { ($0.loadUnaligned(as: UInt64.self), $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
            interface = info.ipi6_ifindex
        default:
            return nil
        }
    }

    /// Writes the control message that makes a reply leave from this address into
    /// `control` (`controlSpace` bytes); returns its length.
    public func writeSourceControl(into control: UnsafeMutableRawPointer) -> Int {
        let header = control.assumingMemoryBound(to: cmsghdr.self)
        let data = control + MemoryLayout<cmsghdr>.size
        if family == AF_INET {
            header.pointee.cmsg_len = MemoryLayout<cmsghdr>.size + MemoryLayout<in_pktinfo>.size
            header.pointee.cmsg_level = Int32(IPPROTO_IP)
            header.pointee.cmsg_type = Int32(IP_PKTINFO)
            var info = in_pktinfo()
            info.ipi_spec_dst.s_addr = UInt32(truncatingIfNeeded: address.0)
            data.storeBytes(of: info, as: in_pktinfo.self)
            return MemoryLayout<cmsghdr>.size + (MemoryLayout<in_pktinfo>.size + 7) / 8 * 8
        }
        header.pointee.cmsg_len = MemoryLayout<cmsghdr>.size + MemoryLayout<IPv6PacketInfo>.size
        header.pointee.cmsg_level = Int32(IPPROTO_IPV6)
        header.pointee.cmsg_type = Int32(IPV6_PKTINFO)
        var info = IPv6PacketInfo()
        withUnsafeMutableBytes(of: &info.ipi6_addr) {
            $0.storeBytes(of: address.0, toByteOffset: 0, as: UInt64.self)
            $0.storeBytes(of: address.1, toByteOffset: 8, as: UInt64.self)
        }
        // The interface it arrived on: needed for a link-local address, harmless otherwise.
        info.ipi6_ifindex = interface
        data.storeBytes(of: info, as: IPv6PacketInfo.self)
        return MemoryLayout<cmsghdr>.size + (MemoryLayout<IPv6PacketInfo>.size + 7) / 8 * 8
    }

    public static func == (a: PacketDestination, b: PacketDestination) -> Bool {
        a.family == b.family && a.address == b.address && a.interface == b.interface
    }
}

/// `struct in6_pktinfo` (RFC 3542), which glibc declares only under _GNU_SOURCE.
struct IPv6PacketInfo {
    var ipi6_addr = in6_addr()
    var ipi6_ifindex: UInt32 = 0
}
