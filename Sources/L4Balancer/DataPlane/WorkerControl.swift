import Atomics
import CLinux
import URing

#if canImport(Glibc)
import Glibc
#endif

/// What the control plane shares with one worker: a wake-up eventfd, the drain request,
/// and the worker's counters. The worker reads the flags only after a wake-up.
public final class WorkerControl: @unchecked Sendable {
    public let index: Int
    public let cpu: Int?
    public let stats: WorkerStats
    let wakeFD: Int32
    let drainRequested = ManagedAtomic<Bool>(false)
    /// Monotonic milliseconds after which remaining connections are closed.
    let drainDeadline = ManagedAtomic<Int64>(Int64.max)

    init(index: Int, cpu: Int?, stats: WorkerStats) throws(Errno) {
        self.index = index
        self.cpu = cpu
        self.stats = stats
        let fd = CLinux_eventfd()
        guard fd >= 0 else { throw Errno(result: fd) }
        wakeFD = fd
    }

    deinit { close(wakeFD) }

    /// Stop accepting; close what is still open after `deadline` (monotonic ms).
    func requestDrain(deadline: Int64) {
        drainDeadline.store(deadline, ordering: .relaxed)
        drainRequested.store(true, ordering: .releasing)
        wake()
    }

    func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }
}

/// Live connection counts per listener across all workers, for `max_connections`. The one
/// piece of mutable state workers share: an atomic add on accept and on close — only on
/// listeners that set a limit; the others touch nothing shared per connection.
public final class ListenerLimits: Sendable {
    let active: [ManagedAtomic<Int>?]
    let maximum: [Int?]

    init(snapshot: Snapshot) {
        maximum = snapshot.listeners.map(\.maxConnections)
        active = maximum.map { $0 == nil ? nil : ManagedAtomic(0) }
    }

    /// Takes a place on `listener`; false when it is full.
    @inline(__always)
    func admit(_ listener: Int) -> Bool {
        guard let counter = active[listener], let maximum = maximum[listener] else { return true }
        let now = counter.loadThenWrappingIncrement(ordering: .relaxed)
        if now < maximum { return true }
        counter.wrappingDecrement(ordering: .relaxed)
        return false
    }

    @inline(__always)
    func leave(_ listener: Int) {
        active[listener]?.wrappingDecrement(ordering: .relaxed)
    }
}

/// Monotonic time in milliseconds (the coarse clock: a vDSO read, a few ns).
func monotonicMilliseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
