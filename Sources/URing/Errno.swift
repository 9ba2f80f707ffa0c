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

    @inlinable public static var interrupted: Errno { Errno(rawValue: EINTR) }
    @inlinable public static var wouldBlock: Errno { Errno(rawValue: EAGAIN) }
    @inlinable public static var noBufferSpace: Errno { Errno(rawValue: ENOBUFS) }
    @inlinable public static var canceled: Errno { Errno(rawValue: ECANCELED) }
    @inlinable public static var timerExpired: Errno { Errno(rawValue: ETIME) }
    @inlinable public static var timedOut: Errno { Errno(rawValue: ETIMEDOUT) }
    @inlinable public static var connectionRefused: Errno { Errno(rawValue: ECONNREFUSED) }
    @inlinable public static var connectionReset: Errno { Errno(rawValue: ECONNRESET) }
    @inlinable public static var brokenPipe: Errno { Errno(rawValue: EPIPE) }
    @inlinable public static var busy: Errno { Errno(rawValue: EBUSY) }
    @inlinable public static var tooManyOpenFiles: Errno { Errno(rawValue: EMFILE) }
    @inlinable public static var fileTableOverflow: Errno { Errno(rawValue: ENFILE) }
    @inlinable public static var notFound: Errno { Errno(rawValue: ENOENT) }
    @inlinable public static var alreadyDone: Errno { Errno(rawValue: EALREADY) }
    @inlinable public static var invalidArgument: Errno { Errno(rawValue: EINVAL) }
    @inlinable public static var notPermitted: Errno { Errno(rawValue: EPERM) }
    @inlinable public static var notImplemented: Errno { Errno(rawValue: ENOSYS) }
    @inlinable public static var outOfMemory: Errno { Errno(rawValue: ENOMEM) }
}
