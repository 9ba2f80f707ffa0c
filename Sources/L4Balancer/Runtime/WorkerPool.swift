import Atomics
import BPFSteer
import Foundation
import Logging
import ServiceLifecycle

/// Starts the workers, one OS thread each pinned to its CPU, and stops them: on graceful
/// shutdown (SIGTERM/SIGINT through the ServiceGroup) every worker stops accepting at
/// once and exits when its connections have finished or `drain_timeout` has passed. It
/// also owns what the control plane shares with them: the published snapshot, endpoint
/// status, listener limits and the identity registry a reload numbers things with.
public final class WorkerPool: Service, @unchecked Sendable {
    public let store: SnapshotStore
    public let registry: IdentityRegistry
    public let controls: [WorkerControl]
    let limits: ListenerLimits
    public let status: EndpointStatus
    public let healthChecker: HealthChecker
    /// The blocklist: XDP where it attaches, else enforced by the workers at accept.
    public let filter: PacketFilter
    let logger: Logger
    let options: Worker.Options
    /// Where the running config came from (re-read on reload).
    public let configPath: String?
    /// Serialises reloads and drain changes; never taken on the data path.
    let controlLock = NSLock()
    public let reloads = ReloadLog()
    /// The kernel's UDP relay, once a listener has asked for `relay: kernel`; replaced
    /// only under `controlLock`.
    var udpRelay: UDPRelay?
    /// The kernel forwarder, when a tcp listener has `relay: kernel` at start.
    let kernelForwarder: KernelForwarder?
    /// Endpoints from DNS for the clusters with `dns:`.
    let dnsDiscovery: DNSDiscoverer
    /// Clusters from the xDS control plane; nil without `xds:`.
    let xdsClient: XDSClient?
    /// The config file as last loaded (before discovery adds to it), and the control plane's
    /// clusters in force: a reload of either composes the running config from both. Guarded
    /// by `controlLock`.
    var fileConfig: Config
    var xdsClusters: [Config.Cluster] = []
    /// The access-log writer, when `access_log` is on.
    public let accessLog: AccessLogWriter?
    let finished = ManagedAtomic<Int>(0)
    /// Set when a drain begins: discovery makes no more snapshots.
    let shuttingDown = ManagedAtomic<Bool>(false)
    private let lock = NSLock()
    private var continuation: CheckedContinuation<Void, Never>?
    private var allFinished = false

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    public var snapshot: Snapshot { store.snapshot }

    public init(config fileConfig: Config, configPath: String? = nil, logger: Logger) throws {
        self.logger = logger
        // Every dns: cluster resolved once before the first snapshot (each bounded by its
        // timeout): a cluster starts with its endpoints, or empty when no answer came.
        var config = fileConfig
        dnsDiscovery = DNSDiscoverer(config: config, logger: logger)
        if !dnsDiscovery.isEmpty {
            dnsDiscovery.resolveDue()
            let found = dnsDiscovery.endpoints
            for i in config.clusters.indices where config.clusters[i].dns != nil {
                config.clusters[i].endpoints = found[config.clusters[i].name] ?? []
            }
        }
        // Listeners may name clusters the control plane has not sent yet: they start empty.
        let composed = config.composed(withDiscovered: [])
        switch ConfigParser.checkComposed(composed.config, settled: Set(config.clusters.map(\.name))) {
        case .success(let checked): config = checked
        case .failure(let errors): throw StartError(description: errors.errors.map(\.description).joined(separator: "; "))
        }
        self.fileConfig = fileConfig
        xdsClient = fileConfig.xds.map { XDSClient(settings: $0, logger: logger) }
        self.configPath = configPath
        self.limits = ListenerLimits(sources: config.rateLimitSources)
        self.status = EndpointStatus()
        self.options = Worker.Options(buffers: config.buffers)
        self.registry = IdentityRegistry()

        let cpus = CPUAffinity.allowedCPUs()
        let count: Int
        switch config.workers {
        case .auto: count = cpus.count
        case .count(let n): count = n
        }
        let rings: [AccessLogRing]? = config.accessLog == .off ? nil : (0..<count).map { _ in AccessLogRing() }
        controls = try (0..<count).map { index in
            try WorkerControl(index: index, cpu: count <= cpus.count ? cpus[index] : nil, stats: WorkerStats(), accessLog: rings?[index])
        }
        if case .on(let path, let format) = config.accessLog, let rings {
            accessLog = AccessLogWriter(rings: rings, registry: registry, path: path, format: format, logger: logger)
        } else {
            accessLog = nil
        }
        let ids: (listeners: [Int], clusters: [Int], endpoints: [[Int]])
        do {
            ids = try registry.assign(config)
        } catch {
            throw StartError(description: error.description)
        }
        // The filter before the listeners: nothing is accepted before the lists hold.
        do {
            filter = try PacketFilter(config.filter, rateTableSize: config.rateLimitSources, logger: logger)
        } catch {
            throw StartError(description: error.description)
        }
        // Listener sockets per worker, opened before any thread starts so a bind error
        // stops the process before it claims to serve.
        let sockets: [[Int32]]
        do {
            sockets = try ListenerSockets.open(config.listeners, workers: count, reusing: nil)
        } catch {
            filter.shutdown()
            throw StartError(description: "\(error)")
        }
        do {
            udpRelay = try WorkerPool.loadUDPRelay(config, loaded: nil)
            kernelForwarder = try KernelForwarder.start(config, status: status)
        } catch {
            filter.shutdown()
            sockets.joined().forEach { close($0) }
            throw StartError(description: "\(error)")
        }
        let snapshot = Snapshot(config: config, generation: 1, ids: ids, previous: nil, listenerSockets: sockets,
                                rateLimitsInKernel: KernelRateLimits.covered(config.listeners, attached: filter.attachedInterfaceNames),
                                relayFlows: udpRelay?.flows, forwarder: kernelForwarder?.relay)
        do {
            try filter.installRateLimits(snapshot)
        } catch {
            filter.shutdown()
            sockets.joined().forEach { close($0) }
            throw StartError(description: "rate_limit: \(error)")
        }
        for endpoint in snapshot.endpoints {
            status.reset(endpoint.id, startsUnhealthy: snapshot.clusters[endpoint.cluster].config.healthCheck.map { !$0.startHealthy } ?? false)
        }
        do {
            try kernelForwarder?.apply(snapshot, paused: WorkerPool.kernelPaused(filter))
        } catch {
            filter.shutdown()
            sockets.joined().forEach { close($0) }
            throw StartError(description: "kernel_relay: \(error)")
        }
        store = SnapshotStore(snapshot)
        healthChecker = HealthChecker(snapshot: snapshot, status: status, workerStats: controls.map(\.stats), logger: logger)
        if let kernelForwarder {
            healthChecker.kernelConnects = { kernelForwarder.connects(endpoint: $0) }
        }
    }

    /// Starts the worker threads; throws when a worker cannot set up its ring.
    public func start() throws {
        let ready = DispatchSemaphore(value: 0)
        let setupErrors = ManagedAtomic<Int>(0)
        let firstError = LockedBox<String?>(nil)
        for control in controls {
            let thread = Thread { [self] in
                if let cpu = control.cpu { CPUAffinity.pinCurrentThread(to: cpu) }
                let worker: Worker
                do {
                    worker = try Worker(store: store, filters: filter.store, control: control, limits: limits, status: status, options: options, logger: logger)
                } catch {
                    setupErrors.wrappingIncrement(ordering: .relaxed)
                    firstError.set { $0 = $0 ?? "worker \(control.index): \(error)" }
                    for fd in store.snapshot.listenerSockets[control.index] { close(fd) }
                    ready.signal()
                    workerFinished()
                    return
                }
                ready.signal()
                worker.run()
                workerFinished()
            }
            thread.name = "l4lb-worker-\(control.index)"
            thread.stackSize = 1 << 20
            thread.start()
        }
        for _ in controls { ready.wait() }
        if setupErrors.load(ordering: .relaxed) > 0 {
            beginDrain(timeoutMilliseconds: 0)
            throw StartError(description: firstError.value ?? "worker setup failed")
        }
        dnsDiscovery.apply = { [weak self] in
            // Not once a drain has begun: what a reload touches is being shut down.
            guard let self, !shuttingDown.load(ordering: .acquiring) else { return true }
            return reload(trigger: "dns", fromFile: false).succeeded
        }
        let isAvailable: @Sendable (String, SocketAddress) -> Bool = { [weak self] cluster, address in
            guard let self else { return true }
            let snapshot = store.snapshot
            guard let plan = snapshot.clusters.first(where: { $0.name == cluster }) else { return true }
            for endpoint in snapshot.endpoints[plan.firstEndpoint..<(plan.firstEndpoint + plan.endpointCount)] where endpoint.address == address {
                return status.flags(endpoint.id).isDisjoint(with: [.unhealthy, .ejected])
            }
            return true
        }
        dnsDiscovery.isAvailable = isAvailable
        dnsDiscovery.start()
        xdsClient?.isAvailable = isAvailable
        xdsClient?.apply = { [weak self] clusters in
            // A reload waits for workers still taking the previous snapshot; try again then.
            for attempt in 0..<100 {
                guard let self, !shuttingDown.load(ordering: .acquiring) else { return ["l4lb is shutting down"] }
                let outcome = reload(trigger: "xds", fromFile: false, xds: clusters)
                if outcome.succeeded { return nil }
                if !outcome.busy || attempt == 99 { return outcome.errors }
                usleep(50_000)
            }
            return nil
        }
        if let xds = fileConfig.xds {
            let expected = fileConfig.undefinedClusterNames
            logger.info("clusters from xDS", metadata: [
                "server": "\(xds.server)", "node": "\(xds.nodeID)",
                "expected_by_listeners": "\(expected.isEmpty ? "none" : expected.joined(separator: ","))",
            ])
        }
        xdsClient?.start()
        logger.info("l4lb serving", metadata: [
            "workers": "\(controls.count)",
            "listeners": "\(snapshot.listeners.map { "\($0.name)=\($0.address)" }.joined(separator: ","))",
        ])
    }

    /// Asks every worker to stop accepting and to close what remains after the timeout.
    public func beginDrain(timeoutMilliseconds: Int64) {
        kernelForwarder?.stopNewFlows()
        shuttingDown.store(true, ordering: .releasing)
        dnsDiscovery.stop()
        xdsClient?.stop()
        let deadline = monotonicMilliseconds() + timeoutMilliseconds
        for control in controls { control.requestDrain(deadline: deadline) }
    }

    private func workerFinished() {
        guard finished.wrappingIncrementThenLoad(ordering: .acquiringAndReleasing) == controls.count else { return }
        lock.lock()
        allFinished = true
        let waiting = continuation
        continuation = nil
        lock.unlock()
        waiting?.resume()
    }

    /// Waits until every worker thread has returned.
    public func waitUntilFinished() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            if allFinished {
                lock.unlock()
                c.resume()
            } else {
                continuation = c
                lock.unlock()
            }
        }
    }

    // MARK: Service

    public func run() async throws {
        // Health first: workers accept only once every endpoint has had its first check.
        healthChecker.start()
        defer { healthChecker.stop() }
        accessLog?.start()
        // After the workers: their last records are written before the process exits.
        defer { accessLog?.stop() }
        try start()
        kernelForwarder?.startSync()
        defer { kernelForwarder?.stop() }
        // Last: the filter holds until the final connection is gone (its lists stay pinned).
        defer { filter.shutdown() }
        await withGracefulShutdownHandler {
            await waitUntilFinished()
        } onGracefulShutdown: { [self] in
            let timeout = store.snapshot.config.drainTimeout
            logger.info("draining", metadata: ["drain_timeout": "\(timeout)"])
            beginDrain(timeoutMilliseconds: timeout.milliseconds)
        }
        logSummary()
    }

    /// One line per listener with its totals across workers.
    public func logSummary() {
        let stats = controls.map(\.stats)
        let snapshot = store.snapshot
        for listener in snapshot.listeners {
            func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: listener.id) }
            logger.info("listener totals", metadata: [
                "listener": "\(listener.name)",
                "accepted": "\(total(.accepted))",
                "refused": "\(total(.refused))",
                "connect_failed": "\(total(.connectFailed))",
                "idle_timeouts": "\(total(.idleTimeouts))",
                "bytes_in": "\(total(.bytesIn))",
                "bytes_out": "\(total(.bytesOut))",
                "accept_errors": "\(total(.acceptErrors))",
                "cluster_full": "\(total(.clusterFull))",
                "closed_unhealthy": "\(total(.closedUnhealthy))",
                "send_timeouts": "\(total(.sendTimeouts))",
                "buffer_waits": "\(total(.bufferWaits))",
            ])
        }
        let violations = RelayChecks.violations.load(ordering: .relaxed)
        if violations > 0 {
            logger.error("relay state violations: transitions outside the table (a bug; please report it)", metadata: ["count": "\(violations)"])
        }
        for control in controls {
            let s = control.stats
            logger.info("worker totals", metadata: [
                "worker": "\(control.index)",
                "iterations": "\(s.value(.iterations))",
                "small_buffers_peak": "\(s.value(.smallBuffersPeak))",
                "large_buffers_peak": "\(s.value(.largeBuffersPeak))",
                "submission_drops": "\(s.value(.submissionDrops))",
                "wait_errors": "\(s.value(.waitErrors))",
                "access_log_drops": "\(s.value(.accessLogDrops))",
            ])
        }
        for endpoint in snapshot.endpoints {
            let e = endpoint.id
            func total(_ c: WorkerStats.EndpointCounter) -> UInt64 { stats.total(c, endpoint: e) }
            logger.info("endpoint totals", metadata: [
                "cluster": "\(snapshot.clusters[endpoint.cluster].name)",
                "endpoint": "\(endpoint.address)",
                "connections": "\(total(.total))",
                "connect_failures": "\(total(.connectFailures))",
                "connect_timeouts": "\(total(.connectTimeouts))",
                "outlier_ejections": "\(healthChecker.ejectionCount(endpoint: e))",
                "health_transitions": "\(healthChecker.transitionCount(endpoint: e))",
            ])
        }
    }
}

/// A value behind a lock, for start-up bookkeeping only.
final class LockedBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value { lock.withLock { stored } }
    func set(_ body: (inout Value) -> Void) { lock.withLock { body(&stored) } }
    /// The value, leaving nil behind.
    func take<T>() -> T? where Value == T? { lock.withLock { defer { stored = nil }; return stored } }
}
