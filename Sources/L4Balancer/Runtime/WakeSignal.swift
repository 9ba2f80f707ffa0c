import CLinux
import URing

#if canImport(Glibc)
import Glibc
#endif

/// An eventfd one thread writes to wake another that polls it (or reads it through its
/// ring): the workers' wake-up, the health checker's. `signal` may be called from any
/// thread, any number of times before the waiter reads; the counter only grows.
final class WakeSignal: @unchecked Sendable {
    let fd: Int32

    init() throws(Errno) {
        let fd = CLinux_eventfd()
        guard fd >= 0 else { throw Errno(result: fd) }
        self.fd = fd
    }

    deinit { close(fd) }

    func signal() {
        var one: UInt64 = 1
        // Fails only when the counter would overflow, which leaves the waiter woken anyway.
        _ = write(fd, &one, 8)
    }

    /// Resets the counter (the waiter has woken).
    func drain() {
        var count: UInt64 = 0
        _ = read(fd, &count, 8)
    }
}
