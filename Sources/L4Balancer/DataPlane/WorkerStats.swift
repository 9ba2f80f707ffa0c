import Atomics

/// A worker's counters: plain integers its own thread increments, and the control plane
/// reads with relaxed atomic loads (for `/stats` and the exit summary). One block per
/// worker; nothing here is shared between workers.
public final class WorkerStats: @unchecked Sendable {
    public enum ListenerCounter: Int, CaseIterable {
        case accepted, active, refused, connectFailed, idleTimeouts, bytesIn, bytesOut, acceptErrors, bufferWaits
        /// Refused because the chosen cluster was at its max_connections (also in `refused`).
        case clusterFull
        /// Closed because their endpoint became unhealthy (`on_unhealthy: close`).
        case closedUnhealthy
    }
    public enum EndpointCounter: Int, CaseIterable {
        case active, total, connectFailures, bytesIn, bytesOut
    }

    let listenerCount: Int
    let endpointCount: Int
    let listenerValues: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    let endpointValues: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

    init(listeners: Int, endpoints: Int) {
        listenerCount = listeners
        endpointCount = endpoints
        let l = listeners * ListenerCounter.allCases.count
        let e = max(endpoints * EndpointCounter.allCases.count, 1)
        listenerValues = .allocate(capacity: l)
        listenerValues.initialize(repeating: UnsafeAtomic<UInt64>.Storage(0), count: l)
        endpointValues = .allocate(capacity: e)
        endpointValues.initialize(repeating: UnsafeAtomic<UInt64>.Storage(0), count: e)
    }

    deinit {
        listenerValues.deallocate()
        endpointValues.deallocate()
    }
    func add(_ counter: ListenerCounter, listener: Int, _ delta: UInt64 = 1) {
        let p = listenerValues + (listener * ListenerCounter.allCases.count + counter.rawValue)
        // Single writer: a relaxed load and store, no read-modify-write instruction.
        let counter = UnsafeAtomic<UInt64>(at: p)
        counter.store(counter.load(ordering: .relaxed) &+ delta, ordering: .relaxed)
    }
    func add(_ counter: EndpointCounter, endpoint: Int, _ delta: UInt64 = 1) {
        let p = endpointValues + (endpoint * EndpointCounter.allCases.count + counter.rawValue)
        let counter = UnsafeAtomic<UInt64>(at: p)
        counter.store(counter.load(ordering: .relaxed) &+ delta, ordering: .relaxed)
    }

    public func value(_ counter: ListenerCounter, listener: Int) -> UInt64 {
        UnsafeAtomic<UInt64>(at: listenerValues + (listener * ListenerCounter.allCases.count + counter.rawValue)).load(ordering: .relaxed)
    }

    public func value(_ counter: EndpointCounter, endpoint: Int) -> UInt64 {
        UnsafeAtomic<UInt64>(at: endpointValues + (endpoint * EndpointCounter.allCases.count + counter.rawValue)).load(ordering: .relaxed)
    }
}

/// Totals across workers, for the exit summary, outlier detection and (later) `/stats`.
extension Array where Element == WorkerStats {
    func total(_ counter: WorkerStats.ListenerCounter, listener: Int) -> UInt64 {
        reduce(0) { $0 &+ $1.value(counter, listener: listener) }
    }

    func total(_ counter: WorkerStats.EndpointCounter, endpoint: Int) -> UInt64 {
        reduce(0) { $0 &+ $1.value(counter, endpoint: endpoint) }
    }
}
