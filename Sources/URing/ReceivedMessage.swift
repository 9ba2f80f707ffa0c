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

    /// `length` is the completion's result; `message` the msghdr the request was made with.
    public init?(buffer: UnsafeMutableRawPointer, length: Int32, message: UnsafeMutablePointer<msghdr>) {
        guard let out = io_uring_recvmsg_validate(buffer, length, message) else { return nil }
        name = UnsafeMutableRawPointer(io_uring_recvmsg_name(out))
        nameLength = Int(min(out.pointee.namelen, UInt32(message.pointee.msg_namelen)))
        payload = io_uring_recvmsg_payload(out, message)
        payloadLength = Int(io_uring_recvmsg_payload_length(out, length, message))
        truncated = out.pointee.flags & UInt32(MSG_TRUNC) != 0
    }

    /// Bytes a provided buffer needs beyond the payload for a request reserving
    /// `nameLength` bytes of address and no control data.
    public static func headerBytes(nameLength: Int) -> Int {
        MemoryLayout<io_uring_recvmsg_out>.size + nameLength
    }
}
