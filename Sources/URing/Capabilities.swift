import CURing

/// What the running kernel's io_uring supports, probed once when a ring is created.
public struct Capabilities: Sendable, CustomStringConvertible {
    public var singleIssuer: Bool
    public var deferTaskrun: Bool
    public var fastPoll: Bool
    /// Batched waits (`IORING_FEAT_MIN_TIMEOUT`, Linux 6.12) with deferred task work.
    public var batchWait: Bool
    public var noDrop: Bool
    public var multishotAccept: Bool
    public var providedBufferRings: Bool
    public var msgRing: Bool
    public var sendZeroCopy: Bool
    public var splice: Bool
    public var socket: Bool
    /// A multishot receive can be given a total byte limit (Linux 6.16), which bounds what
    /// one arm takes from the buffer ring.
    public var multishotReceiveLimit: Bool = false

    public var description: String {
        var on: [String] = []
        if singleIssuer { on.append("single-issuer") }
        if deferTaskrun { on.append("defer-taskrun") }
        if fastPoll { on.append("fast-poll") }
        if batchWait { on.append("batch-wait") }
        if multishotAccept { on.append("multishot-accept") }
        if providedBufferRings { on.append("buffer-rings") }
        if msgRing { on.append("msg-ring") }
        if sendZeroCopy { on.append("send-zc") }
        if splice { on.append("splice") }
        if multishotReceiveLimit { on.append("recv-multishot-limit") }
        return on.joined(separator: ",")
    }

    static let requiredOpcodes: [(UInt8, String)] = [
        (UInt8(IORING_OP_ACCEPT.rawValue), "accept"),
        (UInt8(IORING_OP_CONNECT.rawValue), "connect"),
        (UInt8(IORING_OP_RECV.rawValue), "recv"),
        (UInt8(IORING_OP_SEND.rawValue), "send"),
        (UInt8(IORING_OP_TIMEOUT.rawValue), "timeout"),
        (UInt8(IORING_OP_LINK_TIMEOUT.rawValue), "link_timeout"),
        (UInt8(IORING_OP_ASYNC_CANCEL.rawValue), "async_cancel"),
        (UInt8(IORING_OP_READ.rawValue), "read"),
    ]
}
