import Atomics
import CLinux
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Active health checks and passive outlier detection, on one control-plane thread (never
/// in a worker's loop). Checks use non-blocking sockets and `poll`, so hundreds run
/// concurrently. Results go to `EndpointStatus`, where workers see them at their next pick.
/// Every transition is logged once (endpoint, old → new, reason) and counted. Endpoints
/// are tracked by identity: a reload (`apply`) keeps the state of every endpoint whose
/// check it does not change, checks new ones at once, and forgets removed ones.
public final class HealthChecker: @unchecked Sendable {
    let status: EndpointStatus
    let workerStats: [WorkerStats]
    let logger: Logger
    private let running = ManagedAtomic<Bool>(true)
    /// Targets that have not had their first check yet.
    let unchecked = ManagedAtomic<Int>(0)
    /// Checks not run because l4lb itself was out of descriptors or memory.
    let localFailures = ManagedAtomic<Int>(0)
    private var lastLocalWarning: Int64 = 0
    /// The generation of the snapshot the checker runs on.
    let installed = ManagedAtomic<UInt64>(0)
    private let pending = LockedBox<Snapshot?>(nil)
    /// Written when a snapshot is pending (or on stop), so the loop takes it at once rather
    /// than after its poll's 100 ms: a reload waits for the checker, and xDS may send ten
    /// a second. Nil if it could not be made (the loop then takes snapshots on its next
    /// pass).
    private let wakeSignal = try? WakeSignal()
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    /// Health transitions per endpoint identity (healthy ↔ unhealthy, ejected ↔ returned).
    public let transitions: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    /// Outlier ejections per endpoint identity.
    let ejectionCounts: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>

    var targets: [Target] = []
    /// Sessions with TLS endpoints, so checks resume as the workers' connections do.
    let sessions = UpstreamSessions(capacity: IdentityRegistry.endpointCapacity)
    var outliers: [Outlier] = []
    /// The kernel forwarder's connects to an endpoint (successes, failures), when it has a
    /// kernel listener in front: counted with the workers' (set once, before `start`).
    var kernelConnects: (@Sendable (Int) -> (successes: UInt64, failures: UInt64)?)?

    public init(snapshot: Snapshot, status: EndpointStatus, workerStats: [WorkerStats], logger: Logger) {
        self.status = status
        self.workerStats = workerStats
        self.logger = logger
        transitions = reserve(UnsafeAtomic<Int>.Storage.self, IdentityRegistry.endpointCapacity)
        ejectionCounts = reserve(UnsafeAtomic<Int>.Storage.self, IdentityRegistry.endpointCapacity)
        install(snapshot, now: monotonicMilliseconds())
    }

    deinit {
        munmap(transitions, IdentityRegistry.endpointCapacity * MemoryLayout<UnsafeAtomic<Int>.Storage>.stride)
    }

    private func wake() { wakeSignal?.signal() }

    public func transitionCount(endpoint: Int) -> Int {
        UnsafeAtomic<Int>(at: transitions + endpoint).load(ordering: .relaxed)
    }

    public func ejectionCount(endpoint: Int) -> Int {
        UnsafeAtomic<Int>(at: ejectionCounts + endpoint).load(ordering: .relaxed)
    }

    /// Makes the checker run on `snapshot` (from the next pass of its loop), and waits at
    /// most `timeoutMilliseconds` until every endpoint it adds has had its first check, so
    /// a reload publishes new endpoints with their health known.
    public func apply(_ snapshot: Snapshot, timeoutMilliseconds: Int64) {
        pending.set { $0 = snapshot }
        wake()
        // Installing takes microseconds, a first check up to its timeout.
        waitUntil(deadline: monotonicMilliseconds() + timeoutMilliseconds, longestPause: 2000) {
            installed.load(ordering: .acquiring) >= snapshot.generation && unchecked.load(ordering: .acquiring) == 0
        }
    }

    /// Starts the thread and waits (at most the longest check timeout and initial jitter,
    /// and never past 30 s, + 1 s) until every endpoint has had its first check, so l4lb
    /// does not accept before it knows.
    public func start() {
        let thread = Thread { [self] in
            run()
            finished.signal()
        }
        thread.name = "l4lb-health"
        self.thread = thread
        thread.start()
        let longest = min(targets.map { $0.check.timeout.milliseconds + $0.check.initialJitter.milliseconds }.max() ?? 0,
                          Config.HealthCheck.longestFirstCheckWait)
        let deadline = Date().addingTimeInterval(Double(longest) / 1000 + 1)
        while unchecked.load(ordering: .acquiring) > 0, Date() < deadline { usleep(2000) }
    }

    public func stop() {
        guard thread != nil else { return }
        running.store(false, ordering: .relaxed)
        wake()
        finished.wait()
        thread = nil
    }

    // MARK: Loop

    private func run() {
        var fds: [pollfd] = []
        var owners: [Int] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        var nextOutlierSweep: Int64 = 0
        while running.load(ordering: .relaxed) {
            let now = monotonicMilliseconds()
            if let snapshot = pending.take() { install(snapshot, now: now) }
            for i in targets.indices where targets[i].phase == .idle && targets[i].nextDue <= now { begin(i, now: now) }
            if !outliers.isEmpty, now >= nextOutlierSweep {
                sweepOutliers(now: now)
                nextOutlierSweep = now + 50
            }
            fds.removeAll(keepingCapacity: true)
            owners.removeAll(keepingCapacity: true)
            // A negative descriptor is skipped by poll.
            fds.append(pollfd(fd: wakeSignal?.fd ?? -1, events: Int16(POLLIN), revents: 0))
            owners.append(-1)
            var wake = now + 100
            for (i, t) in targets.enumerated() {
                if t.phase == .idle {
                    wake = min(wake, t.nextDue)
                    continue
                }
                wake = min(wake, t.deadline)
                let events = t.tlsClient != nil ? t.tlsWaits : Int16(t.phase == .reading ? POLLIN : POLLOUT)
                fds.append(pollfd(fd: t.fd, events: events, revents: 0))
                owners.append(i)
            }
            if !outliers.isEmpty { wake = min(wake, nextOutlierSweep) }
            _ = poll(&fds, nfds_t(fds.count), Int32(max(0, min(100, wake - now))))
            let after = monotonicMilliseconds()
            if fds[0].revents != 0 { wakeSignal?.drain() }
            for (k, pfd) in fds.enumerated().dropFirst() {
                let i = owners[k]
                if pfd.revents != 0 {
                    advance(i, revents: pfd.revents, buffer: &buffer, now: after)
                } else if after >= targets[i].deadline {
                    finish(i, passed: false, reason: "timed out after \(targets[i].check.timeout)", now: after)
                }
            }
        }
        for i in targets.indices where targets[i].fd >= 0 {
            targets[i].tlsClient?.free()
            close(targets[i].fd)
        }
    }

    private func begin(_ i: Int, now: Int64) {
        let address = targets[i].address
        var storage = sockaddr_storage()
        let length = address.write(to: &storage)
        let datagram = targets[i].check.transport == .udp
        let type = datagram ? SOCK_DGRAM.rawValue : SOCK_STREAM.rawValue
        let fd = socket(Int32(storage.ss_family), Int32(type) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if case .dns = targets[i].check.kind {
            let id = UInt16(truncatingIfNeeded: targets[i].random.next(below: 65_536))
            let at = datagram ? 0 : 2
            targets[i].queryID = id
            targets[i].request[at] = UInt8(id >> 8)
            targets[i].request[at + 1] = UInt8(id & 0xFF)
        }
        targets[i].started = now
        targets[i].deadline = now + targets[i].check.timeout.milliseconds
        targets[i].sent = 0
        targets[i].received.removeAll(keepingCapacity: true)
        guard fd >= 0 else {
            let code = errno
            guard code == EMFILE || code == ENFILE || code == ENOMEM || code == ENOBUFS else {
                finish(i, passed: false, reason: "socket: \(String(cString: strerror(code)))", now: now)
                return
            }
            // l4lb's own shortage, not the endpoint's: the check neither passes nor fails,
            // and is tried again shortly, so health recovers as soon as l4lb does.
            localFailures.wrappingIncrement(ordering: .relaxed)
            if now - lastLocalWarning >= 60_000 || lastLocalWarning == 0 {
                lastLocalWarning = now
                logger.warning("health check not run: l4lb is short of resources", metadata: metadata(targets[i].cluster, targets[i].address, [
                    "reason": "socket: \(String(cString: strerror(code)))"]))
            }
            targets[i].nextDue = now + min(targets[i].check.interval.milliseconds, 250)
            return
        }
        targets[i].fd = fd
        targets[i].phase = .connecting
        let rc = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
        if rc != 0, errno != EINPROGRESS {
            finish(i, passed: false, reason: "connect: \(String(cString: strerror(errno)))", now: now)
        } else if datagram {
            // A UDP connect only sets the peer: send at once (unless the socket got the
            // endpoint's own loopback port and would hear itself).
            if HealthChecker.isConnectedToItself(fd) {
                finish(i, passed: false, reason: "connected to itself (nothing listens on the port)", now: now)
            } else {
                targets[i].phase = .sending
            }
        }
    }

    private func advance(_ i: Int, revents: Int16, buffer: inout [UInt8], now: Int64) {
        let fd = targets[i].fd
        switch targets[i].phase {
        case .connecting:
            var error: Int32 = 0
            var size = socklen_t(4)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size)
            guard error == 0 else {
                finish(i, passed: false, reason: "connect: \(String(cString: strerror(error)))", now: now)
                return
            }
            // On loopback, connecting to a port nobody listens on can pick that very port as
            // the source and connect the socket to itself: that is not a live endpoint.
            if HealthChecker.isConnectedToItself(fd) {
                finish(i, passed: false, reason: "connected to itself (nothing listens on the port)", now: now)
                return
            }
            if targets[i].wantsTLS {
                guard let context = targets[i].tls, let client = TLSSocketClient(context, fd: fd, endpoint: targets[i].endpoint) else {
                    finish(i, passed: false, reason: "TLS: the cluster's client context could not be built", now: now)
                    return
                }
                targets[i].tlsClient = client
                targets[i].phase = .handshaking
                advance(i, revents: Int16(POLLOUT), buffer: &buffer, now: now)
            } else if case .tcp = targets[i].check.kind {
                finish(i, passed: true, reason: "connected", now: now)
            } else {
                targets[i].phase = .sending
                advance(i, revents: Int16(POLLOUT), buffer: &buffer, now: now)
            }
        case .handshaking:
            switch targets[i].tlsClient!.handshake() {
            case .done:
                if case .tcp = targets[i].check.kind {
                    finish(i, passed: true, reason: "TLS handshake", now: now)
                } else {
                    targets[i].phase = .sending
                    advance(i, revents: Int16(POLLOUT), buffer: &buffer, now: now)
                }
            case .wantRead: targets[i].tlsWaits = Int16(POLLIN)
            case .wantWrite: targets[i].tlsWaits = Int16(POLLOUT)
            case .closed: finish(i, passed: false, reason: "TLS handshake: connection closed", now: now)
            case .failed(let why): finish(i, passed: false, reason: why, now: now)
            }
        case .sending:
            let request = targets[i].request
            if targets[i].sent < request.count, let client = targets[i].tlsClient {
                let (n, step) = request[targets[i].sent...].withUnsafeBytes { client.write($0) }
                if case .failed(let why) = step {
                    finish(i, passed: false, reason: why, now: now)
                    return
                }
                if step == .closed {
                    finish(i, passed: false, reason: "TLS: connection closed", now: now)
                    return
                }
                targets[i].tlsWaits = Int16(step == .wantRead ? POLLIN : POLLOUT)
                targets[i].sent += n
            } else if targets[i].sent < request.count {
                let n = request[targets[i].sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n < 0 {
                    if errno != EAGAIN { finish(i, passed: false, reason: HealthChecker.failure("send", errno), now: now) }
                    return
                }
                targets[i].sent += n
            }
            if targets[i].sent == request.count {
                targets[i].phase = .reading
                targets[i].tlsWaits = Int16(POLLIN)
            }
        case .reading:
            if let client = targets[i].tlsClient {
                // Everything OpenSSL can give now: what it holds raises no poll event.
                var step = TLSSocketClient.Step.done
                var got = false
                while step == .done, targets[i].received.count <= 65_536 {
                    let (n, next) = buffer.withUnsafeMutableBytes { client.read($0) }
                    if n > 0 {
                        targets[i].received += buffer[..<n]
                        got = true
                    }
                    step = next
                }
                if case .failed(let why) = step {
                    finish(i, passed: false, reason: why, now: now)
                    return
                }
                targets[i].tlsWaits = Int16(step == .wantWrite ? POLLOUT : POLLIN)
                if got || step == .closed { judge(i, eof: step == .closed, now: now) }
                return
            }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n < 0 {
                if errno != EAGAIN { finish(i, passed: false, reason: HealthChecker.failure("recv", errno), now: now) }
                return
            }
            if n > 0 { targets[i].received += buffer[..<n] }
            // A datagram is the whole reply.
            judge(i, eof: n == 0 || targets[i].check.transport == .udp, now: now)
        case .idle:
            break
        }
    }

    /// Decides from the bytes so far whether the check passed, failed, or needs more (each
    /// check type's rule is in its own file: `SendExpectCheck`, `DNSCheck`, `HTTPCheck`).
    private func judge(_ i: Int, eof: Bool, now: Int64) {
        let got = targets[i].received
        let datagram = targets[i].check.transport == .udp
        let verdict: HealthCheckVerdict?
        switch targets[i].check.kind {
        case .tcp: verdict = HealthCheckVerdict(passed: true, reason: "connected")
        case .sendExpect(_, let expect): verdict = SendExpectCheck.verdict(got, expect: expect, eof: eof, datagram: datagram)
        case .dns(_, _, let rcodes): verdict = DNSCheck.verdict(got, id: targets[i].queryID, rcodes: rcodes, stream: !datagram, eof: eof)
        case .http(_, _, let statuses): verdict = HTTPCheck.verdict(got, statuses: statuses, eof: eof)
        }
        if let verdict { finish(i, passed: verdict.passed, reason: verdict.reason, now: now) }
    }

    /// A socket error as a reason; ICMP port unreachable reads as what it means for UDP.
    static func failure(_ call: String, _ code: Int32) -> String {
        code == ECONNREFUSED ? "\(call): connection refused (nothing listens on the port)" : "\(call): \(String(cString: strerror(code)))"
    }

    static func isConnectedToItself(_ fd: Int32) -> Bool {
        var local = sockaddr_storage()
        var peer = sockaddr_storage()
        var localLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var peerLength = localLength
        let ok = withUnsafeMutablePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &localLength) == 0 } }
            && withUnsafeMutablePointer(to: &peer) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &peerLength) == 0 } }
        guard ok, localLength == peerLength else { return false }
        return withUnsafeBytes(of: &local) { l in withUnsafeBytes(of: &peer) { p in l.prefix(Int(localLength)).elementsEqual(p.prefix(Int(peerLength))) } }
    }

    private func finish(_ i: Int, passed: Bool, reason: String, now: Int64) {
        if let client = targets[i].tlsClient {
            client.free()
            targets[i].tlsClient = nil
            targets[i].tlsWaits = Int16(POLLOUT)
        }
        if targets[i].fd >= 0 {
            close(targets[i].fd)
            targets[i].fd = -1
        }
        targets[i].phase = .idle
        let check = targets[i].check
        let first = !targets[i].checked
        targets[i].checked = true
        // The next check: one interval after this one started, ± jitter; after the first,
        // at a phase of its own within the interval, so checks spread out.
        var next = targets[i].started + check.interval.milliseconds
        if first {
            next += Int64(targets[i].random.next(below: Int(check.interval.milliseconds)))
        }
        if check.intervalJitter.milliseconds > 0 {
            let span = Int(check.intervalJitter.milliseconds) * 2 + 1
            next += Int64(targets[i].random.next(below: span)) - check.intervalJitter.milliseconds
        }
        targets[i].nextDue = max(next, now + 1)

        let wasHealthy = targets[i].healthy
        if passed {
            targets[i].failures = 0
            targets[i].passes += 1
            // Before the first check an endpoint is unhealthy; one pass is enough then.
            if !wasHealthy, first || targets[i].passes >= check.healthyThreshold {
                // Healthy from the first check is where everyone starts: no slow start.
                transition(i, healthy: true, reason: first ? "first check passed (\(reason))" : "\(targets[i].passes) checks passed (\(reason))",
                           now: now, availableSince: first ? 0 : now)
            }
        } else {
            targets[i].passes = 0
            targets[i].failures += 1
            if wasHealthy, targets[i].failures >= check.unhealthyThreshold {
                transition(i, healthy: false, reason: "\(targets[i].failures) checks failed, last: \(reason)", now: now)
            } else if first, !wasHealthy {
                logger.warning("endpoint failed its first health check", metadata: metadata(targets[i].cluster, targets[i].address, ["reason": "\(reason)"]))
            }
        }
        if first { unchecked.wrappingDecrement(ordering: .releasing) }
    }

    private func transition(_ i: Int, healthy: Bool, reason: String, now: Int64, availableSince: Int64 = 0) {
        targets[i].healthy = healthy
        let endpoint = targets[i].endpoint
        status.set(.unhealthy, !healthy, endpoint: endpoint, now: availableSince)
        UnsafeAtomic<Int>(at: transitions + endpoint).wrappingIncrement(ordering: .relaxed)
        logger.info("endpoint health changed", metadata: metadata(targets[i].cluster, targets[i].address, [
            "from": "\(healthy ? "unhealthy" : "healthy")", "to": "\(healthy ? "healthy" : "unhealthy")", "reason": "\(reason)",
        ]))
    }

    func metadata(_ cluster: String, _ address: SocketAddress, _ extra: Logger.Metadata) -> Logger.Metadata {
        extra.merging(["cluster": "\(cluster)", "endpoint": "\(address)"]) { a, _ in a }
    }
}
