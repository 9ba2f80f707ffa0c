/// A relative duration in the kernel's `__kernel_timespec` layout. Timeout requests point
/// at one; keep it at a stable address until the request is submitted.
public struct Timeout: Sendable, Equatable {
    public var seconds: Int64
    public var nanoseconds: Int64

    public init(seconds: Int64 = 0, nanoseconds: Int64 = 0) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    public init(milliseconds: Int64) {
        self.seconds = milliseconds / 1000
        self.nanoseconds = (milliseconds % 1000) * 1_000_000
    }
}
