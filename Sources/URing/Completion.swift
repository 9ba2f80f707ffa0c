/// One completion, copied out of the completion queue so the queue slot can be released
/// at once. Plain values only: iterating completions never allocates.
public struct Completion: Sendable {
    public var userData: UInt64
    public var result: Int32
    public var flags: UInt32

    @inlinable
    public init(userData: UInt64, result: Int32, flags: UInt32) {
        self.userData = userData
        self.result = result
        self.flags = flags
    }

    /// The request that produced this completion stays armed (multishot).
    @inlinable
    public var hasMore: Bool { flags & 2 != 0 }  // IORING_CQE_F_MORE

    /// The provided buffer the kernel filled, when one was selected.
    @inlinable
    public var bufferID: UInt16? {
        flags & 1 != 0 ? UInt16(truncatingIfNeeded: flags >> 16) : nil  // IORING_CQE_F_BUFFER
    }

    /// A zero-copy send's notification that the kernel released the buffer.
    @inlinable
    public var isNotification: Bool { flags & 8 != 0 }  // IORING_CQE_F_NOTIF

    /// The error, when `result` is negative.
    @inlinable
    public var error: Errno? { result < 0 ? Errno(result: result) : nil }
}
