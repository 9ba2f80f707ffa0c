#if canImport(Glibc)
import Glibc
#endif

/// Waits until `condition` holds or `deadline` (monotonic ms) passes, polling with pauses
/// that start at 50 µs and double up to `longestPause` µs: what another thread does on a
/// wake-up takes microseconds, so the first checks come soon, and a long wait costs few
/// context switches. True when the condition held.
@discardableResult
func waitUntil(deadline: Int64, longestPause: UInt32, _ condition: () -> Bool) -> Bool {
    var pause: UInt32 = 50
    while true {
        if condition() { return true }
        guard monotonicMilliseconds() < deadline else { return false }
        usleep(pause)
        pause = min(pause * 2, longestPause)
    }
}
