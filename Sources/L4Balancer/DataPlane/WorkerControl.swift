import Atomics
import CLinux
import URing

#if canImport(Glibc)
import Glibc
#endif

/// What the control plane shares with one worker: a wake-up eventfd, the drain request,
/// and the worker's counters. The worker reads the flags (and the published snapshot) only
/// after a wake-up.
public final class WorkerControl: @unchecked Sendable {
    public let index: Int
    public let cpu: Int?
    public let stats: WorkerStats
    let wakeSignal: WakeSignal
    /// The worker's access-log ring, when the access log is on.
    let accessLog: AccessLogRing?
    let drainRequested = ManagedAtomic<Bool>(false)
    /// Monotonic milliseconds after which remaining connections are closed.
    let drainDeadline = ManagedAtomic<Int64>(Int64.max)

    init(index: Int, cpu: Int?, stats: WorkerStats, accessLog: AccessLogRing? = nil) throws(Errno) {
        self.index = index
        self.cpu = cpu
        self.stats = stats
        self.accessLog = accessLog
        wakeSignal = try WakeSignal()
    }

    /// Stop accepting; close what is still open after `deadline` (monotonic ms).
    func requestDrain(deadline: Int64) {
        drainDeadline.store(deadline, ordering: .relaxed)
        drainRequested.store(true, ordering: .releasing)
        wake()
    }

    func wake() { wakeSignal.signal() }
}

/// Live connection counts per listener (by identity) across all workers, for
/// `max_connections`. The one piece of mutable state workers share: an atomic add on
/// accept and on close, only on listeners that set a limit (the plan says which); the
/// others touch nothing shared per connection.
///
/// It also holds the per-source table of `rate_limit` (buckets and connection counts per
/// source prefix), touched only by listeners that set one.
public final class ListenerLimits: @unchecked Sendable {
    let active: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    let sources: SourceTable

    init(sources: Int = Config.defaultRateLimitSources) {
        active = reserve(UnsafeAtomic<Int>.Storage.self, IdentityRegistry.listenerCapacity)
        self.sources = SourceTable(capacity: sources)
    }

    /// Takes a place on listener `id`; false when it already holds `maximum`.
    @inline(__always)
    func admit(_ id: Int, maximum: Int) -> Bool {
        let counter = UnsafeAtomic<Int>(at: active + id)
        if counter.loadThenWrappingIncrement(ordering: .relaxed) < maximum { return true }
        counter.wrappingDecrement(ordering: .relaxed)
        return false
    }

    @inline(__always)
    func leave(_ id: Int) {
        UnsafeAtomic<Int>(at: active + id).wrappingDecrement(ordering: .relaxed)
    }
}

/// Where the control plane publishes the snapshot new connections run on: one atomic
/// reference, stored once per reload, loaded by a worker only after a wake-up.
public final class SnapshotStore: Sendable {
    private let current: ManagedAtomic<Snapshot>

    init(_ snapshot: Snapshot) {
        current = ManagedAtomic(snapshot)
    }

    public var snapshot: Snapshot { current.load(ordering: .acquiring) }

    func publish(_ snapshot: Snapshot) {
        current.store(snapshot, ordering: .releasing)
    }
}

extension Snapshot: AtomicReference {}

/// Monotonic time in milliseconds (the coarse clock: a vDSO read, a few ns).
func monotonicMilliseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
