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
    private let unchecked = ManagedAtomic<Int>(0)
    /// Checks not run because l4lb itself was out of descriptors or memory.
    let localFailures = ManagedAtomic<Int>(0)
    private var lastLocalWarning: Int64 = 0
    /// The generation of the snapshot the checker runs on.
    private let installed = ManagedAtomic<UInt64>(0)
    private let pending = LockedBox<Snapshot?>(nil)
    /// Written when a snapshot is pending (or on stop), so the loop takes it at once rather
    /// than after its poll's 100 ms: a reload waits for the checker, and xDS may send ten
    /// a second. -1 if it could not be made (poll ignores it; the loop then takes snapshots
    /// on its next pass).
    private let wakeFD = CLinux_eventfd()
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    /// Health transitions per endpoint identity (healthy ↔ unhealthy, ejected ↔ returned).
    public let transitions: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    /// Outlier ejections per endpoint identity.
    let ejectionCounts: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>

    /// One endpoint under active checks.
    struct Target {
        enum Phase { case idle, connecting, handshaking, sending, reading }

        /// The endpoint's identity.
        let endpoint: Int
        let cluster: String
        let address: SocketAddress
        let check: Config.HealthCheck
        /// What the check sends (a DNS query gets a fresh ID each time).
        var request: [UInt8]
        /// Clusters with `tls:`: the check runs over TLS, as the proxied connections do
        /// (`wantsTLS` with no context: it fails, never checks in plaintext).
        var wantsTLS = false
        var tls: TLSClientContext?
        var tlsClient: TLSSocketClient?
        /// TLS: what the socket must become for OpenSSL's next step (POLLIN or POLLOUT).
        var tlsWaits = Int16(POLLOUT)
        var queryID: UInt16 = 0
        var phase = Phase.idle
        var fd: Int32 = -1
        var started: Int64 = 0
        var deadline: Int64 = 0
        var nextDue: Int64 = 0
        var sent = 0
        var received: [UInt8] = []
        var passes = 0
        var failures = 0
        var healthy: Bool
        var checked = false
        var random: FastRandom
    }

    /// Outlier-detection bookkeeping for one endpoint.
    struct Outlier {
        /// The endpoint's and its cluster's identity.
        let endpoint: Int
        let cluster: Int
        let clusterName: String
        let address: SocketAddress
        let detection: Config.OutlierDetection
        var failuresAtLastSuccess: UInt64 = 0
        var lastSuccesses: UInt64 = 0
        var ejectedUntil: Int64 = 0
        var ejections = 0
        var returnedAt: Int64 = 0
    }

    var targets: [Target] = []
    /// Sessions with TLS endpoints, so checks resume as the workers' connections do.
    private let sessions = UpstreamSessions(capacity: IdentityRegistry.endpointCapacity)
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
        if wakeFD >= 0 { close(wakeFD) }
    }

    private func wake() {
        var one: UInt64 = 1
        if wakeFD >= 0 { _ = write(wakeFD, &one, 8) }
    }

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
        let deadline = monotonicMilliseconds() + timeoutMilliseconds
        // Installing takes microseconds, a first check up to its timeout: short waits first.
        var pause: UInt32 = 50
        while monotonicMilliseconds() < deadline {
            if installed.load(ordering: .acquiring) >= snapshot.generation, unchecked.load(ordering: .acquiring) == 0 { return }
            usleep(pause)
            pause = min(pause * 2, 2000)
        }
    }

    /// Rebuilds the targets for `snapshot`, by identity: same endpoint and same check keeps
    /// its target as it is (an unhealthy endpoint stays unhealthy, thresholds carry on); a
    /// changed check starts over from the endpoint's current health; a new endpoint is
    /// checked at once. Same for outlier detection.
    private func install(_ snapshot: Snapshot, now: Int64) {
        var oldTargets: [Int: Target] = [:]
        for t in targets { oldTargets[t.endpoint] = t }
        var oldOutliers: [Int: Outlier] = [:]
        for o in outliers { oldOutliers[o.endpoint] = o }
        var newTargets: [Target] = []
        var newOutliers: [Outlier] = []
        // One client context per cluster with `tls:` (kept while its settings stay).
        var contexts: [String: TLSClientContext] = [:]
        for t in targets { if let tls = t.tls { contexts[t.cluster] = tls } }
        for cluster in snapshot.clusters {
            guard let settings = cluster.config.tls, cluster.config.healthCheck?.transport == .tcp else {
                contexts[cluster.name] = nil
                continue
            }
            if contexts[cluster.name]?.settings != settings { contexts[cluster.name] = TLSClientContext(settings, sessions: sessions) }
        }
        for endpoint in snapshot.endpoints {
            let cluster = snapshot.clusters[endpoint.cluster]
            let id = endpoint.id
            if let check = cluster.config.healthCheck {
                let wantsTLS = cluster.config.tls != nil && check.transport == .tcp
                if let old = oldTargets[id], old.check == check, old.wantsTLS == wantsTLS, old.tls === contexts[cluster.name] {
                    oldTargets[id] = nil
                    newTargets.append(old)
                } else {
                    var random = FastRandom(seed: StableHash.endpoint(endpoint.address, seed: 3))
                    var target = Target(
                        endpoint: id, cluster: cluster.name, address: endpoint.address, check: check,
                        request: HealthChecker.request(check, endpoint.address), nextDue: now,
                        healthy: !status.flags(id).contains(.unhealthy), random: random)
                    target.wantsTLS = wantsTLS
                    target.tls = contexts[cluster.name]
                    if let old = oldTargets[id] {
                        // The check changed: keep the health it has, let thresholds decide.
                        old.tlsClient?.free()
                        if old.fd >= 0 { close(old.fd) }
                        oldTargets[id] = nil
                        target.checked = true
                    } else {
                        let jitter = check.initialJitter.milliseconds > 0 ? Int64(random.next(below: Int(check.initialJitter.milliseconds))) : 0
                        target.nextDue = now + jitter
                        target.random = random
                    }
                    newTargets.append(target)
                }
            } else if status.flags(id).contains(.unhealthy) {
                // No check any more: nothing says it is unhealthy.
                status.set(.unhealthy, false, endpoint: id, now: 0)
            }
            if let detection = cluster.config.outlierDetection {
                if let old = oldOutliers[id], old.detection == detection {
                    oldOutliers[id] = nil
                    newOutliers.append(old)
                } else {
                    // Changed settings start over; an ejection under the old ones ends now.
                    if let old = oldOutliers.removeValue(forKey: id), old.ejectedUntil > 0 {
                        status.set(.ejected, false, endpoint: id, now: now)
                    }
                    newOutliers.append(Outlier(
                        endpoint: id, cluster: cluster.id, clusterName: cluster.name, address: endpoint.address,
                        detection: detection, failuresAtLastSuccess: workerStats.total(.connectFailures, endpoint: id),
                        lastSuccesses: workerStats.total(.total, endpoint: id)))
                }
            }
        }
        // Removed endpoints (and endpoints whose detection was turned off) are forgotten;
        // an ejection outlier detection can no longer end is ended now.
        for old in oldTargets.values where old.fd >= 0 {
            old.tlsClient?.free()
            close(old.fd)
        }
        for old in oldOutliers.values where old.ejectedUntil > 0 { status.set(.ejected, false, endpoint: old.endpoint, now: now) }
        targets = newTargets
        outliers = newOutliers
        // Every target still waiting for its first check (new ones, and any an earlier
        // reload added that has not had it yet).
        unchecked.store(newTargets.filter { !$0.checked }.count, ordering: .releasing)
        installed.store(snapshot.generation, ordering: .releasing)
    }

    static func request(_ check: Config.HealthCheck, _ address: SocketAddress) -> [UInt8] {
        switch check.kind {
        case .tcp: return []
        case .dns(let query, let type, _):
            let message = DNSQuery.message(query: query, type: type)
            return check.transport == .udp ? message : [UInt8(message.count >> 8), UInt8(message.count & 0xFF)] + message
        case .sendExpect(let send, _): return send
        case .http(let path, let host, _):
            return Array("GET \(path) HTTP/1.1\r\nHost: \(host ?? address.description)\r\nUser-Agent: l4lb-health-check\r\nConnection: close\r\n\r\n".utf8)
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
            fds.append(pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0))
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
            if fds[0].revents != 0 {
                var count: UInt64 = 0
                _ = read(wakeFD, &count, 8)
            }
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

    /// Decides from the bytes so far whether the check passed, failed, or needs more.
    private func judge(_ i: Int, eof: Bool, now: Int64) {
        let got = targets[i].received
        switch targets[i].check.kind {
        case .tcp:
            finish(i, passed: true, reason: "connected", now: now)
        case .sendExpect(_, let expect):
            if got.count >= expect.count {
                let passed = Array(got.prefix(expect.count)) == expect
                finish(i, passed: passed, reason: passed ? "expected reply" : "unexpected reply \(printable(got.prefix(32)))", now: now)
            } else if got != Array(expect.prefix(got.count)) {
                finish(i, passed: false, reason: "unexpected reply \(printable(got.prefix(32)))", now: now)
            } else if eof {
                let udp = targets[i].check.transport == .udp
                finish(i, passed: false, reason: udp ? "a reply of \(got.count) bytes, shorter than expected" : "connection closed after \(got.count) bytes", now: now)
            }
        case .dns(_, _, let rcodes):
            switch DNSQuery.judge(got, id: targets[i].queryID, stream: targets[i].check.transport == .tcp) {
            case .answer(let rcode):
                finish(i, passed: rcodes.contains(rcode), reason: "DNS \(DNSQuery.rcodeName(rcode))", now: now)
            case .invalid(let why):
                finish(i, passed: false, reason: why, now: now)
            case .incomplete:
                if eof { finish(i, passed: false, reason: "connection closed after \(got.count) bytes", now: now) }
            }
        case .http(_, _, let statuses):
            if let lineEnd = got.firstIndex(of: 0x0A) {
                let line = String(decoding: got[..<lineEnd], as: UTF8.self)
                let parts = line.split(separator: " ")
                if parts.count >= 2, parts[0].hasPrefix("HTTP/"), let code = Int(parts[1]) {
                    finish(i, passed: statuses.contains(code), reason: "HTTP \(code)", now: now)
                } else {
                    finish(i, passed: false, reason: "not an HTTP response: \(printable(got.prefix(32)))", now: now)
                }
            } else if eof || got.count > 8192 {
                finish(i, passed: false, reason: "no HTTP status line", now: now)
            }
        }
    }

    /// A socket error as a reason; ICMP port unreachable reads as what it means for UDP.
    static func failure(_ call: String, _ code: Int32) -> String {
        code == ECONNREFUSED ? "\(call): connection refused (nothing listens on the port)" : "\(call): \(String(cString: strerror(code)))"
    }

    private func printable<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
        "\"" + bytes.map { $0 >= 0x20 && $0 < 0x7F ? String(UnicodeScalar($0)) : ($0 == 0x0D ? "\\r" : ($0 == 0x0A ? "\\n" : "\\x" + String($0, radix: 16))) }.joined() + "\""
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

    private func metadata(_ cluster: String, _ address: SocketAddress, _ extra: Logger.Metadata) -> Logger.Metadata {
        extra.merging(["cluster": "\(cluster)", "endpoint": "\(address)"]) { a, _ in a }
    }

    // MARK: Outlier detection

    /// Reads the workers' connect counters: an endpoint whose connects failed
    /// `consecutive_failures` times with no success in between is ejected for
    /// `ejection_time`, doubled on each repeat up to `max_ejection_time`, unless that
    /// would eject more than `max_ejection_percent` of its cluster.
    private func sweepOutliers(now: Int64) {
        for k in outliers.indices {
            let e = outliers[k].endpoint
            let kernel = kernelConnects?(e)
            let failures = workerStats.total(.connectFailures, endpoint: e) &+ (kernel?.failures ?? 0)
            let successes = workerStats.total(.total, endpoint: e) &+ (kernel?.successes ?? 0)
            let detection = outliers[k].detection
            if successes != outliers[k].lastSuccesses {
                outliers[k].lastSuccesses = successes
                outliers[k].failuresAtLastSuccess = failures
            }
            if outliers[k].ejectedUntil > 0 {
                guard now >= outliers[k].ejectedUntil else { continue }
                outliers[k].ejectedUntil = 0
                outliers[k].returnedAt = now
                outliers[k].failuresAtLastSuccess = failures
                status.set(.ejected, false, endpoint: e, now: now)
                UnsafeAtomic<Int>(at: transitions + e).wrappingIncrement(ordering: .relaxed)
                logger.info("endpoint returned from ejection", metadata: metadata(outliers[k].clusterName, outliers[k].address, ["from": "ejected", "to": "available"]))
                continue
            }
            let consecutive = failures &- outliers[k].failuresAtLastSuccess
            guard consecutive >= UInt64(detection.consecutiveFailures) else { continue }
            let members = outliers.filter { $0.cluster == outliers[k].cluster }
            let ejected = members.filter { $0.ejectedUntil > 0 }.count
            guard (ejected + 1) * 100 <= detection.maxEjectionPercent * members.count else { continue }
            // Repeat offenders stay out longer; a quiet max_ejection_time forgives.
            if outliers[k].returnedAt > 0, now - outliers[k].returnedAt > detection.maxEjectionTime.milliseconds {
                outliers[k].ejections = 0
            }
            let factor = Int64(1) << min(outliers[k].ejections, 20)
            let duration = min(detection.ejectionTime.milliseconds * factor, max(detection.maxEjectionTime.milliseconds, detection.ejectionTime.milliseconds))
            outliers[k].ejections += 1
            outliers[k].ejectedUntil = now + duration
            status.set(.ejected, true, endpoint: e, now: now)
            UnsafeAtomic<Int>(at: transitions + e).wrappingIncrement(ordering: .relaxed)
            UnsafeAtomic<Int>(at: ejectionCounts + e).wrappingIncrement(ordering: .relaxed)
            logger.info("endpoint ejected", metadata: metadata(outliers[k].clusterName, outliers[k].address, [
                "from": "available", "to": "ejected", "reason": "\(consecutive) consecutive connect failures",
                "ejection_time": "\(ConfigDuration(milliseconds: duration))",
            ]))
        }
    }
}
