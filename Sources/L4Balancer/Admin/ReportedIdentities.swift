/// What `/stats` and `/metrics` both report beyond the running config: listeners and
/// endpoints a reload removed that still have connections open, and the access log's
/// line counts.
extension WorkerPool {
    /// Removed listeners (not in `snapshot`) with connections still open, by identity.
    func removedListenersWithConnections(_ snapshot: Snapshot) -> [(id: Int, name: String)] {
        let stats = controls.map(\.stats)
        let running = Set(snapshot.listeners.map(\.id))
        return registry.allListeners.enumerated().compactMap { id, name in
            guard !running.contains(id), Int64(bitPattern: stats.total(.active, listener: id)) > 0 else { return nil }
            return (id, name)
        }
    }

    /// Removed endpoints (not in `snapshot`) with connections still open, by identity.
    func removedEndpointsWithConnections(_ snapshot: Snapshot) -> [(id: Int, key: IdentityRegistry.EndpointKey)] {
        let stats = controls.map(\.stats)
        let current = Set(snapshot.endpoints.map(\.id))
        return registry.allEndpoints.enumerated().compactMap { id, key in
            guard !current.contains(id), Int64(bitPattern: stats.total(.active, endpoint: id)) > 0 else { return nil }
            return (id, key)
        }
    }

    /// Lines written, and lines dropped (in the workers' rings or at the write); nil when
    /// the access log is off.
    var accessLogTotals: (written: Int, dropped: Int)? {
        guard let accessLog else { return nil }
        let inRings = controls.reduce(0) { $0 + Int($1.stats.value(.accessLogDrops)) }
        return (accessLog.written.load(ordering: .relaxed), accessLog.dropped.load(ordering: .relaxed) + inRings)
    }
}
