import Foundation

/// One reload attempt, as `/stats`, `POST /reload` and the log report it.
public struct ReloadOutcome: Sendable {
    public let succeeded: Bool
    /// The generation running after the attempt (unchanged when it failed).
    public let generation: UInt64
    /// Every error, as `path: message` (the same lines `l4lb check` prints).
    public let errors: [String]
    /// What changed, one line each (`listener dns added`, ...).
    public let changes: [String]
    public let trigger: String
    public let finishedAt: Date
    public let milliseconds: Int64
    /// Failed only because workers were still taking the previous snapshot.
    public var busy = false
}

/// Counts and the last few outcomes of reloads.
public final class ReloadLog: @unchecked Sendable {
    private let lock = NSLock()
    private var succeededCount = 0
    private var failedCount = 0
    private var recent: [ReloadOutcome] = []

    func record(_ outcome: ReloadOutcome) {
        lock.withLock {
            if outcome.succeeded { succeededCount += 1 } else { failedCount += 1 }
            recent.append(outcome)
            if recent.count > 10 { recent.removeFirst(recent.count - 10) }
        }
    }

    public var succeeded: Int { lock.withLock { succeededCount } }
    public var failed: Int { lock.withLock { failedCount } }
    public var last: ReloadOutcome? { lock.withLock { recent.last } }
}

extension WorkerPool {
    /// How long a reload waits for every worker to take the new snapshot.
    static let adoptionTimeoutMilliseconds: Int64 = 5000

    /// Re-reads the config file and, if it is valid, makes it the running config without
    /// touching established connections (DESIGN §1). An invalid file changes nothing and
    /// reports every error. Returns once every worker runs new connections on it.
    /// Reloads are serialised; this blocks (health checks of new endpoints, adoption), so
    /// call it off the async executors.
    public func reload(trigger: String) -> ReloadOutcome {
        reload(trigger: trigger, fromFile: true)
    }

    /// `config` with each `dns:` cluster's endpoints as discovery has them now, or as
    /// `seeded` has them for a cluster new to it.
    func withDiscoveredEndpoints(_ config: Config, seeded: [String: [DNSDiscoverer.Tiered]] = [:]) -> Config {
        let found = dnsDiscovery.endpoints
        var config = config
        for i in config.clusters.indices where config.clusters[i].dns != nil {
            let name = config.clusters[i].name
            config.clusters[i].endpoints = seeded[name].map { DNSDiscoverer.serving($0) { _ in true } } ?? found[name] ?? []
        }
        return config
    }

    /// A reload: of the config file (`fromFile`), or of the running config with the
    /// endpoints discovery found (the same path, so a removed endpoint drains as on any
    /// reload).
    func reload(trigger: String, fromFile: Bool, xds proposed: [Config.Cluster]? = nil) -> ReloadOutcome {
        controlLock.lock()
        defer { controlLock.unlock() }
        let started = monotonicMilliseconds()
        let old = store.snapshot
        func fail(_ errors: [String], busy: Bool = false) -> ReloadOutcome {
            var outcome = ReloadOutcome(
                succeeded: false, generation: old.generation, errors: errors, changes: [], trigger: trigger,
                finishedAt: Date(), milliseconds: monotonicMilliseconds() - started)
            outcome.busy = busy
            reloads.record(outcome)
            logger.error("reload failed; the running config is unchanged", metadata: [
                "trigger": "\(trigger)", "generation": "\(old.generation)", "errors": "\(errors.joined(separator: "; "))",
            ])
            return outcome
        }
        let path = configPath
        if fromFile, path == nil { return fail(["l4lb was started without a config file to re-read"]) }
        // One snapshot at a time: a worker never skips one, so every listener socket a
        // reload opens reaches the worker that owns (and eventually closes) it.
        let behind = controls.filter { $0.stats.value(.adoptedGeneration) != old.generation }.map(\.index)
        guard behind.isEmpty else {
            return fail(["workers \(behind.map(String.init).joined(separator: ",")) have not taken generation \(old.generation) yet (starting or draining); try again"],
                        busy: true)
        }
        let base: Config
        var parsedFile: Config?
        var seeded: [String: [DNSDiscoverer.Tiered]] = [:]
        if let path, fromFile {
            switch ConfigParser.load(path: path) {
            case .success(let parsed):
                seeded = dnsDiscovery.resolveNew(in: parsed)
                base = withDiscoveredEndpoints(parsed, seeded: seeded)
                parsedFile = parsed
            case .failure(let errors): return fail(errors.errors.map(\.description))
            }
        } else {
            base = withDiscoveredEndpoints(fileConfig)
        }
        // The control plane's clusters beside the file's: proposed ones on an xDS update,
        // else those in force.
        let composed = base.composed(withDiscovered: proposed ?? xdsClusters)
        guard composed.errors.isEmpty else { return fail(composed.errors) }
        let config: Config
        switch ConfigParser.checkComposed(composed.config, settled: Set(base.clusters.map(\.name))) {
        case .success(let checked): config = checked
        case .failure(let errors): return fail(errors.errors.map { Self.naming($0, in: composed.config) })
        }
        let fixed = WorkerPool.restartOnlyChanges(from: old.config, to: config)
        guard fixed.isEmpty else { return fail(fixed) }
        let ids: (listeners: [Int], clusters: [Int], endpoints: [[Int]])
        let sockets: [[Int32]]
        do {
            ids = try registry.assign(config)
            sockets = try ListenerSockets.open(config.listeners, workers: controls.count, reusing: old)
        } catch let error as ListenerSockets.OpenError {
            return fail([error.description])
        } catch {
            return fail(["\(error)"])
        }
        // On a failure below: the sockets this reload opened (the rest are still in use).
        func closeNewSockets() {
            let kept = Set(old.listenerSockets.joined())
            for fd in sockets.joined() where !kept.contains(fd) { close(fd) }
        }
        do {
            udpRelay = try WorkerPool.loadUDPRelay(config, loaded: udpRelay)
        } catch {
            closeNewSockets()
            return fail([error.description])
        }
        // The lists last of what can fail, as a diff (never a moment with an empty list);
        // the workers take the user-space copy with the snapshot's wake-up below. On an
        // error the config's previous lists are put back and the new sockets closed.
        let filterChange: (added: Int, removed: Int)
        do {
            filterChange = try filter.apply(config.filter)
        } catch {
            _ = try? filter.apply(old.config.filter)
            closeNewSockets()
            return fail(["filter: \(error)"])
        }
        let snapshot = Snapshot(config: config, generation: old.generation + 1, ids: ids, previous: old, listenerSockets: sockets,
                                rateLimitsInKernel: KernelRateLimits.covered(config.listeners, attached: filter.attachedInterfaceNames),
                                relayFlows: udpRelay?.flows, forwarder: kernelForwarder?.relay)
        // XDP's rate rules before the workers take the snapshot that leaves the buckets to it.
        do {
            try filter.installRateLimits(snapshot)
        } catch {
            _ = try? filter.installRateLimits(old)
            _ = try? filter.apply(old.config.filter)
            closeNewSockets()
            return fail(["rate_limit: \(error)"])
        }

        // Endpoints new to the running config start as l4lb starts them: unhealthy until a
        // first check passes. The checker checks them now, before any worker can pick them.
        let running = Set(old.endpoints.map(\.id))
        for endpoint in snapshot.endpoints where !running.contains(endpoint.id) {
            status.reset(endpoint.id, startsUnhealthy: snapshot.clusters[endpoint.cluster].config.healthCheck.map { !$0.startHealthy } ?? false)
        }
        applyControlPlaneMarks(snapshot)
        // The kernel's plans and services last of what can fail (new endpoints enter its
        // slots as the reset above left them), put back as they were on an error.
        // Installed kernel flows keep their endpoint either way.
        do {
            try kernelForwarder?.apply(snapshot, paused: WorkerPool.kernelPaused(filter))
        } catch {
            try? kernelForwarder?.apply(old, paused: WorkerPool.kernelPaused(filter))
            _ = try? filter.installRateLimits(old)
            _ = try? filter.apply(old.config.filter)
            closeNewSockets()
            return fail(["kernel_relay: \(error)"])
        }
        let longestCheck = min(config.clusters.compactMap { $0.healthCheck.map { $0.timeout.milliseconds + $0.initialJitter.milliseconds } }.max() ?? 0,
                               Config.HealthCheck.longestFirstCheckWait)
        healthChecker.apply(snapshot, timeoutMilliseconds: longestCheck + 1000)

        store.publish(snapshot)
        for control in controls { control.wake() }
        if fromFile { dnsDiscovery.update(config: config, seeded: seeded) }
        if let parsedFile {
            fileConfig = parsedFile
            xdsClient?.fileReloaded()
        }
        if let proposed { xdsClusters = proposed }
        var lagging: [Int] = []
        // A woken worker adopts within microseconds to a millisecond.
        waitUntil(deadline: monotonicMilliseconds() + WorkerPool.adoptionTimeoutMilliseconds, longestPause: 1000) {
            lagging = controls.filter { $0.stats.value(.adoptedGeneration) < snapshot.generation }.map(\.index)
            return lagging.isEmpty
        }
        var changes = WorkerPool.changes(from: old, to: snapshot)
        if filterChange.added + filterChange.removed > 0 {
            changes.append("filter: \(filterChange.added) entries added, \(filterChange.removed) removed")
        }
        if !lagging.isEmpty { changes.append("workers \(lagging.map(String.init).joined(separator: ",")) have not adopted it yet") }
        // The old snapshot is released here, on this thread, once the workers have let go of
        // its plan: not by a worker (its memory is this thread's, and freeing it from a
        // worker could wait on this thread's malloc arena while this thread, in the idle
        // class for xDS, waits for a CPU).
        withExtendedLifetime(old) {}
        let outcome = ReloadOutcome(
            succeeded: true, generation: snapshot.generation, errors: [], changes: changes, trigger: trigger,
            finishedAt: Date(), milliseconds: monotonicMilliseconds() - started)
        reloads.record(outcome)
        // Ten lines at most: a control plane may change fifty clusters ten times a second.
        let shown = changes.count > 10 ? changes.prefix(10) + ["and \(changes.count - 10) more"] : changes[...]
        logger.info("reloaded", metadata: [
            "trigger": "\(trigger)", "generation": "\(snapshot.generation)",
            "changes": "\(changes.isEmpty ? "none" : shown.joined(separator: "; "))", "ms": "\(outcome.milliseconds)",
        ])
        return outcome
    }

    /// What the xDS control plane says of each endpoint (EDS `health_status`), as flags the
    /// workers and the kernel's choice honour like health and drain.
    func applyControlPlaneMarks(_ snapshot: Snapshot) {
        let now = monotonicMilliseconds()
        for plan in snapshot.clusters where plan.config.fromXDS {
            for (i, endpoint) in plan.config.endpoints.enumerated() {
                let id = snapshot.endpoints[plan.firstEndpoint + i].id
                status.set(.markedUnhealthy, endpoint.controlPlaneMark == .unhealthy, endpoint: id, now: now)
                status.set(.markedDraining, endpoint.controlPlaneMark == .draining, endpoint: id, now: now)
            }
        }
    }

    /// A check's error about `clusters[N]` of a composed config, by the cluster's name (a
    /// discovered cluster has no place in the file).
    static func naming(_ error: ConfigError, in config: Config) -> String {
        var text = error.description
        if text.hasPrefix("clusters["), let close = text.firstIndex(of: "]"),
           let index = Int(text[text.index(text.startIndex, offsetBy: 9)..<close]), config.clusters.indices.contains(index) {
            text = "cluster \"\(config.clusters[index].name)\"" + text[text.index(after: close)...]
        }
        return text
    }

    /// Settings a running process cannot take on: they size or bind what exists once.
    static func restartOnlyChanges(from old: Config, to new: Config) -> [String] {
        var errors: [String] = []
        if old.xds != new.xds { errors.append("xds: cannot change on reload; restart l4lb to apply") }
        if old.workers != new.workers { errors.append("workers: cannot change on reload; restart l4lb to apply") }
        if old.kernelRelay != new.kernelRelay { errors.append("kernel_relay: cannot change on reload; restart l4lb to apply") }
        if !old.wantsKernelForwarding, new.wantsKernelForwarding {
            errors.append("listeners: the first listener the kernel forwards (relay: kernel) needs a restart (the kernel forwarder loads at start)")
        }
        if old.buffers != new.buffers { errors.append("buffers: cannot change on reload; restart l4lb to apply") }
        if old.accessLog != new.accessLog { errors.append("access_log: cannot change on reload; restart l4lb to apply (SIGUSR1 reopens the file)") }
        if old.filter.interfaces != new.filter.interfaces || old.filter.mode != new.filter.mode || old.filter.pinPath != new.filter.pinPath {
            errors.append("filter.xdp: cannot change on reload; restart l4lb to apply (the lists reload)")
        }
        if old.rateLimitSources != new.rateLimitSources {
            errors.append("rate_limit.table_size: cannot change on reload (\(old.rateLimitSources) → \(new.rateLimitSources)); restart l4lb to apply (the limits reload)")
        }
        if old.admin.address != new.admin.address {
            errors.append("admin.address: cannot change on reload (\(old.admin.address) → \(new.admin.address)); restart l4lb to apply")
        }
        for (key, a, b) in [("max_connections", "\(old.admin.maxConnections)", "\(new.admin.maxConnections)"),
                            ("idle_timeout", "\(old.admin.idleTimeout)", "\(new.admin.idleTimeout)"),
                            ("request_timeout", "\(old.admin.requestTimeout)", "\(new.admin.requestTimeout)")] where a != b {
            errors.append("admin.\(key): cannot change on reload (\(a) → \(b)); restart l4lb to apply (token and allowed_hosts reload)")
        }
        return errors
    }

    /// One line per listener, cluster and endpoint a reload added, removed or changed.
    static func changes(from old: Snapshot, to new: Snapshot) -> [String] {
        var lines: [String] = []
        let oldListeners = Dictionary(old.config.listeners.map { ($0.name, $0) }) { a, _ in a }
        let newListeners = Dictionary(new.config.listeners.map { ($0.name, $0) }) { a, _ in a }
        for listener in new.config.listeners {
            if let before = oldListeners[listener.name] {
                if before != listener { lines.append("listener \(listener.name) changed") }
            } else {
                lines.append("listener \(listener.name) added (\(listener.address))")
            }
        }
        for listener in old.config.listeners where newListeners[listener.name] == nil { lines.append("listener \(listener.name) removed") }
        let oldClusters = Dictionary(old.config.clusters.map { ($0.name, $0) }) { a, _ in a }
        let newClusters = Dictionary(new.config.clusters.map { ($0.name, $0) }) { a, _ in a }
        for cluster in new.config.clusters {
            guard let before = oldClusters[cluster.name] else {
                lines.append("cluster \(cluster.name) added")
                continue
            }
            guard before != cluster else { continue }
            // Same endpoints in the same order (weights or settings changed): no sets to build,
            // which matters at an EDS update every 100 ms over 1,000 endpoints.
            if before.endpoints.lazy.map(\.address).elementsEqual(cluster.endpoints.lazy.map(\.address)) {
                lines.append("cluster \(cluster.name) changed" + (before.balancer != cluster.balancer
                    ? " (balancer \(before.balancer.rawValue) → \(cluster.balancer.rawValue))" : ""))
                continue
            }
            let was = Set(before.endpoints.map(\.address))
            let now = Set(cluster.endpoints.map(\.address))
            let added = cluster.endpoints.map(\.address).filter { !was.contains($0) }
            let removed = before.endpoints.map(\.address).filter { !now.contains($0) }
            var parts: [String] = []
            if !added.isEmpty { parts.append("+\(added.map(\.description).joined(separator: ","))") }
            if !removed.isEmpty { parts.append("-\(removed.map(\.description).joined(separator: ","))") }
            if before.balancer != cluster.balancer { parts.append("balancer \(before.balancer.rawValue) → \(cluster.balancer.rawValue)") }
            lines.append("cluster \(cluster.name) changed" + (parts.isEmpty ? "" : " (\(parts.joined(separator: " ")))"))
        }
        for cluster in old.config.clusters where newClusters[cluster.name] == nil { lines.append("cluster \(cluster.name) removed") }
        return lines
    }

    public enum DrainError: Error, CustomStringConvertible {
        case unknownCluster(String)
        case unknownEndpoint(cluster: String, address: String)
        case badAddress(String)

        public var description: String {
            switch self {
            case .unknownCluster(let name): return "no cluster \"\(name)\" in the running config"
            case .unknownEndpoint(let cluster, let address): return "cluster \"\(cluster)\" has no endpoint \(address)"
            case .badAddress(let reason): return "not an address (ip:port or [v6]:port): \(reason)"
            }
        }
    }

    /// Drains an endpoint of the running config (no new connections; open ones finish), or
    /// undoes it. Kept by identity, so it survives reloads that keep the endpoint.
    public func setDraining(_ draining: Bool, cluster: String, address text: String) throws(DrainError) {
        controlLock.lock()
        defer { controlLock.unlock() }
        let address: SocketAddress
        switch SocketAddress.parse(text) {
        case .success(let parsed): address = parsed
        case .failure(let error): throw .badAddress(error.description)
        }
        let snapshot = store.snapshot
        guard snapshot.clusters.contains(where: { $0.name == cluster }) else { throw .unknownCluster(cluster) }
        guard let position = snapshot.endpointPosition(cluster: cluster, address: address) else {
            throw .unknownEndpoint(cluster: cluster, address: text)
        }
        let id = snapshot.endpoints[position].id
        let was = status.flags(id).contains(.draining)
        status.set(.draining, draining, endpoint: id, now: monotonicMilliseconds())
        if was != draining {
            logger.info(draining ? "endpoint draining" : "endpoint no longer draining", metadata: ["cluster": "\(cluster)", "endpoint": "\(address)"])
        }
    }
}
