import Atomics

#if canImport(Glibc)
import Glibc
#endif

/// What the control plane knows about every endpoint, shared with the workers: health,
/// ejection and drain flags (written by the health checker, outlier detection and the
/// admin API), when an endpoint last became available (for slow start), and live
/// connection counts across workers (for circuit breaking). Workers read it at pick time
/// with relaxed loads, so a change reaches every worker on its next pick. Indexed by
/// stable identity (`IdentityRegistry`), not config position: a reload that leaves an
/// endpoint alone leaves its state alone. Sized once for every identity the process can
/// have; untouched entries are never made resident.
public final class EndpointStatus: @unchecked Sendable {
    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Failed its active health checks (or not yet passed the first one).
        public static let unhealthy = Flags(rawValue: 1)
        /// Ejected by outlier detection.
        public static let ejected = Flags(rawValue: 2)
        /// Drained by the operator: no new connections, open ones finish.
        public static let draining = Flags(rawValue: 4)
        /// Marked UNHEALTHY or TIMEOUT by the xDS control plane (EDS `health_status`).
        public static let markedUnhealthy = Flags(rawValue: 8)
        /// Marked DRAINING by the xDS control plane: no new connections, open ones finish.
        public static let markedDraining = Flags(rawValue: 16)
    }

    @usableFromInline let flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>
    @usableFromInline let availableSince: UnsafeMutablePointer<UnsafeAtomic<Int64>.Storage>
    @usableFromInline let connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    @usableFromInline let clusterConnections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    /// Bumped whenever an endpoint stops being healthy or is ejected (workers re-check open
    /// connections for `on_unhealthy: close`).
    public let unavailableEpoch = ManagedAtomic<UInt64>(0)
    /// Moves whenever an endpoint turns available or unavailable (or is reset): what the
    /// kernel forwarder watches to copy availability into its maps at once.
    public let availabilityEpoch = ManagedAtomic<UInt64>(0)

    public init(endpoints: Int = IdentityRegistry.endpointCapacity, clusters: Int = IdentityRegistry.clusterCapacity) {
        // Fresh anonymous pages read as 0: every flag clear, every count 0.
        flags = reserve(UnsafeAtomic<UInt8>.Storage.self, endpoints)
        availableSince = reserve(UnsafeAtomic<Int64>.Storage.self, endpoints)
        connections = reserve(UnsafeAtomic<Int>.Storage.self, endpoints)
        clusterConnections = reserve(UnsafeAtomic<Int>.Storage.self, clusters)
    }

    /// Puts an endpoint that is new to the running config in its starting state: unhealthy
    /// until its first check passes when it has one, not ejected, not drained.
    public func reset(_ endpoint: Int, startsUnhealthy: Bool) {
        UnsafeAtomic<UInt8>(at: flags + endpoint).store(startsUnhealthy ? Flags.unhealthy.rawValue : 0, ordering: .relaxed)
        availabilityEpoch.wrappingIncrement(ordering: .releasing)
        UnsafeAtomic<Int64>(at: availableSince + endpoint).store(0, ordering: .relaxed)
    }

    /// Takes a place on the cluster (identity `cluster`) under `limit`; false when full.
    /// Only clusters with a limit are counted: the caller remembers that it took a place.
    public func admit(cluster: Int, limit: Int) -> Bool {
        let atomic = UnsafeAtomic<Int>(at: clusterConnections + cluster)
        if atomic.loadThenWrappingIncrement(ordering: .relaxed) < limit { return true }
        atomic.wrappingDecrement(ordering: .relaxed)
        return false
    }

    public func leave(cluster: Int) {
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
        // Turning unhealthy or ejected is news for `on_unhealthy: close` even when the
        // endpoint was already unavailable for another reason (drained, say).
        if on, !before.contains(flag), !flag.isDisjoint(with: [.unhealthy, .ejected, .markedUnhealthy]) {
            unavailableEpoch.wrappingIncrement(ordering: .releasing)
        }
        if !before.isEmpty, after.isEmpty {
            UnsafeAtomic<Int64>(at: availableSince + endpoint).store(now, ordering: .relaxed)
        }
        if before.isEmpty != after.isEmpty { availabilityEpoch.wrappingIncrement(ordering: .releasing) }
        return before.isEmpty != after.isEmpty
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

    /// Takes a place on the endpoint (identity) under `limit`; false when it is full.
    /// Endpoints without a limit are not counted (the caller does not call this), so
    /// workers share no cache line for them.
    @inlinable
    public func admit(_ endpoint: Int, limit: Int) -> Bool {
        let atomic = UnsafeAtomic<Int>(at: connections + endpoint)
        if atomic.loadThenWrappingIncrement(ordering: .relaxed) < limit { return true }
        atomic.wrappingDecrement(ordering: .relaxed)
        return false
    }

    @inlinable
    public func leave(_ endpoint: Int) {
        UnsafeAtomic<Int>(at: connections + endpoint).wrappingDecrement(ordering: .relaxed)
    }

    /// The view a balancer uses for one cluster of `snapshot`.
    @inlinable
    public func view(_ snapshot: Snapshot, firstEndpoint: Int) -> EndpointView {
        EndpointView(flags: flags, connections: connections, ids: snapshot.endpointIDs + firstEndpoint, limits: snapshot.endpointLimits + firstEndpoint)
    }
}

/// One cluster's slice of `EndpointStatus`: whether an endpoint may take a new connection
/// (healthy, not ejected, not drained, below its connection limit). A plain struct of
/// pointers: `ids` maps the cluster's positions to identities, `limits` is per position.
public struct EndpointView: @unchecked Sendable {
    @usableFromInline let flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>?
    @usableFromInline let connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>?
    @usableFromInline let ids: UnsafeMutablePointer<Int32>?
    @usableFromInline let limits: UnsafeMutablePointer<Int>?

    @inlinable
    init(
        flags: UnsafeMutablePointer<UnsafeAtomic<UInt8>.Storage>, connections: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>,
        ids: UnsafeMutablePointer<Int32>, limits: UnsafeMutablePointer<Int>
    ) {
        self.flags = flags
        self.connections = connections
        self.ids = ids
        self.limits = limits
    }

    @inlinable
    init() {
        flags = nil
        connections = nil
        ids = nil
        limits = nil
    }

    /// Every endpoint available (benchmarks, unit tests).
    public static let allAvailable = EndpointView()

    @inlinable
    public func isAvailable(_ i: Int) -> Bool {
        guard let flags, let connections, let ids, let limits else { return true }
        let id = Int(ids[i])
        guard UnsafeAtomic<UInt8>(at: flags + id).load(ordering: .relaxed) == 0 else { return false }
        return limits[i] == Int.max || UnsafeAtomic<Int>(at: connections + id).load(ordering: .relaxed) < limits[i]
    }
}
