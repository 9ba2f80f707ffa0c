import Atomics

/// What the control plane knows about every endpoint, shared with the workers: health
/// and ejection flags (written by the health checker and outlier detection), when an
/// endpoint last became available (for slow start), and live connection counts across
/// workers (for circuit breaking). Workers read it at pick time with relaxed loads, so a
/// change reaches every worker on its next pick. Indexed like `Snapshot.endpoints`.
public final class EndpointStatus: @unchecked Sendable {
    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Failed its active health checks (or not yet passed the first one).
        public static let unhealthy = Flags(rawValue: 1)
        /// Ejected by outlier detection.
        public static let ejected = Flags(rawValue: 2)
    }

    public let count: Int
    @usableFromInline let flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>
    @usableFromInline let availableSince: UnsafeMutablePointer<UnsafeAtomic<Int64>.Storage>
    @usableFromInline let connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    @usableFromInline let limits: UnsafeMutablePointer<Int>
    @usableFromInline let clusterConnections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    @usableFromInline let clusterLimits: [Int]
    /// Bumped whenever an endpoint stops being available (workers re-check open
    /// connections for `on_unhealthy: close`).
    public let unavailableEpoch = ManagedAtomic<UInt64>(0)

    public init(snapshot: Snapshot) {
        count = snapshot.endpoints.count
        let n = max(count, 1)
        flags = .allocate(capacity: n)
        availableSince = .allocate(capacity: n)
        connections = .allocate(capacity: n)
        limits = .allocate(capacity: n)
        clusterConnections = .allocate(capacity: max(snapshot.clusters.count, 1))
        clusterConnections.initialize(repeating: .init(0), count: max(snapshot.clusters.count, 1))
        clusterLimits = snapshot.config.clusters.map { $0.maxConnections ?? Int.max }
        for i in 0..<n {
            let endpoint = i < count ? snapshot.endpoints[i] : nil
            let check = endpoint.flatMap { snapshot.config.clusters[$0.cluster].healthCheck }
            let startsUnhealthy = check.map { !$0.startHealthy } ?? false
            (flags + i).initialize(to: .init(startsUnhealthy ? Flags.unhealthy.rawValue : 0))
            (availableSince + i).initialize(to: .init(0))
            (connections + i).initialize(to: .init(0))
            limits[i] = endpoint?.maxConnections ?? Int.max
        }
    }

    deinit {
        flags.deallocate()
        availableSince.deallocate()
        connections.deallocate()
        limits.deallocate()
        clusterConnections.deallocate()
    }

    /// Takes a place on the cluster; false when it is at its `max_connections`.
    public func admit(cluster: Int) -> Bool {
        guard clusterLimits[cluster] != Int.max else { return true }
        let atomic = UnsafeAtomic<Int>(at: clusterConnections + cluster)
        if atomic.loadThenWrappingIncrement(ordering: .relaxed) < clusterLimits[cluster] { return true }
        atomic.wrappingDecrement(ordering: .relaxed)
        return false
    }

    public func leave(cluster: Int) {
        guard clusterLimits[cluster] != Int.max else { return }
        UnsafeAtomic<Int>(at: clusterConnections + cluster).wrappingDecrement(ordering: .relaxed)
    }

    @inlinable
    public func flags(_ endpoint: Int) -> Flags {
        Flags(rawValue: UnsafeAtomic<UInt8>(at: flags + endpoint).load(ordering: .relaxed))
    }

    /// Sets or clears `flag`; returns whether availability changed. `now` is recorded as
    /// the moment it became available again (0: no slow start).
    @discardableResult
    public func set(_ flag: Flags, _ on: Bool, endpoint: Int, now: Int64) -> Bool {
        let atomic = UnsafeAtomic<UInt8>(at: flags + endpoint)
        let before = Flags(rawValue: on
            ? atomic.loadThenBitwiseOr(with: flag.rawValue, ordering: .relaxed)
            : atomic.loadThenBitwiseAnd(with: ~flag.rawValue, ordering: .relaxed))
        let after = on ? before.union(flag) : before.subtracting(flag)
        if before.isEmpty, !after.isEmpty {
            unavailableEpoch.wrappingIncrement(ordering: .releasing)
            return true
        }
        if !before.isEmpty, after.isEmpty {
            UnsafeAtomic<Int64>(at: availableSince + endpoint).store(now, ordering: .relaxed)
            return true
        }
        return false
    }

    /// Monotonic ms when the endpoint last became available again; 0 if it always was.
    @inlinable
    public func availableSince(_ endpoint: Int) -> Int64 {
        UnsafeAtomic<Int64>(at: availableSince + endpoint).load(ordering: .relaxed)
    }

    /// Live connections to the endpoint across workers (counted only under a limit).
    @inlinable
    public func connections(_ endpoint: Int) -> Int {
        UnsafeAtomic<Int>(at: connections + endpoint).load(ordering: .relaxed)
    }

    /// Takes a place on the endpoint; false when it is at `max_connections`. Endpoints
    /// without a limit are not counted, so workers share no cache line for them.
    @inlinable
    public func admit(_ endpoint: Int) -> Bool {
        guard limits[endpoint] != Int.max else { return true }
        let atomic = UnsafeAtomic<Int>(at: connections + endpoint)
        if atomic.loadThenWrappingIncrement(ordering: .relaxed) < limits[endpoint] { return true }
        atomic.wrappingDecrement(ordering: .relaxed)
        return false
    }

    @inlinable
    public func leave(_ endpoint: Int) {
        guard limits[endpoint] != Int.max else { return }
        UnsafeAtomic<Int>(at: connections + endpoint).wrappingDecrement(ordering: .relaxed)
    }

    /// The view a balancer uses for one cluster.
    @inlinable
    public func view(firstEndpoint: Int) -> EndpointView {
        EndpointView(flags: flags + firstEndpoint, connections: connections + firstEndpoint, limits: limits + firstEndpoint)
    }
}

/// One cluster's slice of `EndpointStatus`: whether an endpoint may take a new connection
/// (healthy, not ejected, below its connection limit). A plain struct of pointers.
public struct EndpointView: @unchecked Sendable {
    @usableFromInline let flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>?
    @usableFromInline let connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>?
    @usableFromInline let limits: UnsafeMutablePointer<Int>?

    @inlinable
    init(flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>, connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>, limits: UnsafeMutablePointer<Int>) {
        self.flags = flags
        self.connections = connections
        self.limits = limits
    }

    @inlinable
    init() {
        flags = nil
        connections = nil
        limits = nil
    }

    /// Every endpoint available (benchmarks, unit tests).
    public static let allAvailable = EndpointView()

    @inlinable
    public func isAvailable(_ i: Int) -> Bool {
        guard let flags, let connections, let limits else { return true }
        return UnsafeAtomic<UInt8>(at: flags + i).load(ordering: .relaxed) == 0
            && UnsafeAtomic<Int>(at: connections + i).load(ordering: .relaxed) < limits[i]
    }
}
