#if canImport(Glibc)
import Glibc
#endif

/// A POSIX error number. liburing returns `-errno`; `Errno(result:)` is the one place that
/// turns such a result into this type.
public struct Errno: Error, Equatable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    @inlinable
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// From a negative io_uring/liburing result (`-errno`).
    @inlinable
    public init(result: Int32) { self.rawValue = -result }

    /// From the thread's `errno` after a failed system call.
    @inlinable
    public static var current: Errno { Errno(rawValue: errno) }

    public var description: String {
        String(cString: strerror(rawValue)) + " (errno \(rawValue))"
    }

    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    public static let noBufferSpace = Errno(rawValue: ENOBUFS)
    public static let canceled = Errno(rawValue: ECANCELED)
    public static let timerExpired = Errno(rawValue: ETIME)
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    public static let connectionRefused = Errno(rawValue: ECONNREFUSED)
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    public static let brokenPipe = Errno(rawValue: EPIPE)
    public static let busy = Errno(rawValue: EBUSY)
    public static let tooManyOpenFiles = Errno(rawValue: EMFILE)
    public static let fileTableOverflow = Errno(rawValue: ENFILE)
    public static let notFound = Errno(rawValue: ENOENT)
    public static let alreadyDone = Errno(rawValue: EALREADY)
    public static let invalidArgument = Errno(rawValue: EINVAL)
    public static let notPermitted = Errno(rawValue: EPERM)
    public static let notImplemented = Errno(rawValue: ENOSYS)
}
