import URing

#if canImport(Glibc)
import Glibc
#endif

/// The data plane's direct socket calls, in one place (as swift-nio's `System.swift`):
/// each returns its result or throws the `Errno` it failed with, so a caller either
/// handles the failure or says with `try?` why it has nothing to do about it. Requests
/// that go through the ring report their errors in `Completion.error` instead.
enum SocketCalls {
    @inline(__always)
    static func open(family: Int32, type: Int32) throws(Errno) -> Int32 {
        let fd = socket(family, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Errno.current }
        return fd
    }

    @inline(__always)
    static func connect(_ fd: Int32, to address: UnsafePointer<sockaddr>, length: socklen_t) throws(Errno) {
        guard Glibc.connect(fd, address, length) == 0 else { throw Errno.current }
    }

    /// A direct syscall, not IORING_OP_SHUTDOWN: the ring runs shutdown on an io-wq thread,
    /// which could resolve the descriptor number after it was closed and reused.
    @inline(__always)
    static func shutdown(_ fd: Int32, _ how: Int32) throws(Errno) {
        guard Glibc.shutdown(fd, how) == 0 else { throw Errno.current }
    }

    @inline(__always)
    static func setOption<Value>(_ fd: Int32, level: Int32, _ name: Int32, _ value: Value) throws(Errno) {
        var value = value
        guard setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Value>.size)) == 0 else { throw Errno.current }
    }

    @inline(__always)
    static func close(_ fd: Int32) {
        // Linux releases the descriptor even when close reports an error (EINTR, EIO):
        // retrying could close a number another thread has been given since.
        _ = Glibc.close(fd)
    }
}
