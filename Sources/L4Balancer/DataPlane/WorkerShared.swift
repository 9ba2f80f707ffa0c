#if canImport(Glibc)
import Glibc
#endif

/// What a worker shares with the control side and with other workers: the published
/// snapshot and filter, the listeners' connection counts and source table, and the
/// endpoints' health and connection counts. Each is safe to read (and, where it says so,
/// to update) from any thread; the worker never holds one across an event.
struct WorkerShared {
    let store: SnapshotStore
    let filters: FilterStore
    let limits: ListenerLimits
    let status: EndpointStatus
}

/// This worker's own connections (connecting or connected) per endpoint and per cluster
/// identity, for least-request and bounded-load picks. Reserved for every identity,
/// touched only for those in use; written by this worker alone.
struct WorkerActiveCounts {
    let byEndpoint: UnsafeMutablePointer<Int32>
    let byCluster: UnsafeMutablePointer<Int>

    init() {
        byEndpoint = reserve(Int32.self, IdentityRegistry.endpointCapacity)
        byCluster = reserve(Int.self, IdentityRegistry.clusterCapacity)
    }

    func deallocate() {
        munmap(byEndpoint, IdentityRegistry.endpointCapacity * MemoryLayout<Int32>.stride)
        munmap(byCluster, IdentityRegistry.clusterCapacity * MemoryLayout<Int>.stride)
    }
}
