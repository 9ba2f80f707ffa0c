import Atomics
import Foundation
import Logging
import ServiceLifecycle

/// Starts the workers, one OS thread each pinned to its CPU, and stops them: on graceful
/// shutdown (SIGTERM/SIGINT through the ServiceGroup) every worker stops accepting at
/// once and exits when its connections have finished or `drain_timeout` has passed.
public final class WorkerPool: Service, @unchecked Sendable {
    public let snapshot: Snapshot
    public let controls: [WorkerControl]
    let limits: ListenerLimits
    public let status: EndpointStatus
    public let healthChecker: HealthChecker
    let logger: Logger
    let options: Worker.Options
    /// Listener sockets per worker, opened before any thread starts so a bind error stops
    /// the process before it claims to serve.
    var listenerFDs: [[Int32]]
    let finished = ManagedAtomic<Int>(0)
    private let lock = NSLock()
    private var continuation: CheckedContinuation<Void, Never>?
    private var allFinished = false

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(snapshot: Snapshot, logger: Logger) throws {
        self.snapshot = snapshot
        self.logger = logger
        self.limits = ListenerLimits(snapshot: snapshot)
        self.status = EndpointStatus(snapshot: snapshot)
        self.options = Worker.Options(buffers: snapshot.config.buffers)

        let cpus = CPUAffinity.allowedCPUs()
        let count: Int
        switch snapshot.config.workers {
        case .auto: count = cpus.count
        case .count(let n): count = n
        }
        controls = try (0..<count).map { index in
            try WorkerControl(
                index: index, cpu: count <= cpus.count ? cpus[index] : nil,
                stats: WorkerStats(listeners: snapshot.listeners.count, endpoints: snapshot.endpoints.count))
        }
        healthChecker = HealthChecker(snapshot: snapshot, status: status, workerStats: controls.map(\.stats), logger: logger)
        var fds: [[Int32]] = []
        do {
            for _ in 0..<count {
                fds.append(try snapshot.listeners.map { try ListenerSocket.open(name: $0.name, address: $0.address) })
            }
        } catch {
            for fd in fds.joined() { close(fd) }
            throw StartError(description: "\(error)")
        }
        listenerFDs = fds
    }

    /// Starts the worker threads; throws when a worker cannot set up its ring.
    public func start() throws {
        let ready = DispatchSemaphore(value: 0)
        let setupErrors = ManagedAtomic<Int>(0)
        let firstError = LockedBox<String?>(nil)
        for control in controls {
            let fds = listenerFDs[control.index]
            let thread = Thread { [self] in
                if let cpu = control.cpu { CPUAffinity.pinCurrentThread(to: cpu) }
                let worker: Worker
                do {
                    worker = try Worker(
                        snapshot: snapshot, control: control, limits: limits, status: status, listenerFDs: fds, options: options, logger: logger)
                } catch {
                    setupErrors.wrappingIncrement(ordering: .relaxed)
                    firstError.set { $0 = $0 ?? "worker \(control.index): \(error)" }
                    for fd in fds { close(fd) }
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
        logger.info("l4lb serving", metadata: [
            "workers": "\(controls.count)",
            "listeners": "\(snapshot.listeners.map { "\($0.name)=\($0.address)" }.joined(separator: ","))",
        ])
    }

    /// Asks every worker to stop accepting and to close what remains after the timeout.
    public func beginDrain(timeoutMilliseconds: Int64) {
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
        try start()
        await withGracefulShutdownHandler {
            await waitUntilFinished()
        } onGracefulShutdown: { [self] in
            logger.info("draining", metadata: ["drain_timeout": "\(snapshot.config.drainTimeout)"])
            beginDrain(timeoutMilliseconds: snapshot.config.drainTimeout.milliseconds)
        }
        logSummary()
    }

    /// One line per listener with its totals across workers.
    public func logSummary() {
        let stats = controls.map(\.stats)
        for (i, listener) in snapshot.listeners.enumerated() {
            func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: i) }
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
        for control in controls {
            let s = control.stats
            logger.info("worker totals", metadata: [
                "worker": "\(control.index)",
                "iterations": "\(s.value(.iterations))",
                "small_buffers_peak": "\(s.value(.smallBuffersPeak))",
                "large_buffers_peak": "\(s.value(.largeBuffersPeak))",
                "submission_drops": "\(s.value(.submissionDrops))",
                "wait_errors": "\(s.value(.waitErrors))",
            ])
        }
        for (e, endpoint) in snapshot.endpoints.enumerated() {
            func total(_ c: WorkerStats.EndpointCounter) -> UInt64 { stats.total(c, endpoint: e) }
            logger.info("endpoint totals", metadata: [
                "cluster": "\(snapshot.clusters[endpoint.cluster].name)",
                "endpoint": "\(endpoint.address)",
                "connections": "\(total(.total))",
                "connect_failures": "\(total(.connectFailures))",
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
}
