import Atomics
import BPFSteer

#if canImport(Glibc)
import Glibc
#endif

/// A worker's counters: plain integers its own thread increments, and the control plane
/// reads with relaxed atomic loads (for `/stats` and the exit summary). Indexed by stable
/// identity (`IdentityRegistry`), so totals carry on across reloads. One block per worker,
/// page-aligned and reserved for every identity the process can have: only counters that
/// are ever written become resident, and two workers never write the same cache line.
public final class WorkerStats: @unchecked Sendable {
    public enum ListenerCounter: Int, CaseIterable, Sendable {
        case accepted, active, refused, connectFailed, idleTimeouts, bytesIn, bytesOut, acceptErrors, bufferWaits
        /// Refused because the chosen cluster was at its max_connections (also in `refused`).
        case clusterFull
        /// Closed because their endpoint became unhealthy (`on_unhealthy: close`).
        case closedUnhealthy
        /// Closed because a peer accepted nothing for `send_timeout`.
        case sendTimeouts
        /// Closed because a reload removed their listener `drain_timeout` ago.
        case drainTimeouts
        /// UDP: datagrams relayed from clients / to clients; sessions evicted by
        /// max_sessions. (Sessions use `accepted`, `active` and `idleTimeouts`; a receive
        /// that waited for a free buffer, `bufferWaits`.)
        case datagramsIn, datagramsOut, sessionsEvicted
        /// UDP datagrams dropped, by reason: no endpoint could take a new session (or its
        /// socket could not be opened); the submission queue was full; truncated or from
        /// an unusable address; a reply to a per-packet lease that had ended; the send
        /// failed (the upstream's or client's socket buffer full, an ICMP error).
        case dropsNoEndpoint, dropsQueueFull, dropsMalformed, dropsLateReply, dropsSendFailed
        /// TLS: handshakes completed by version, of which resumed; their total latency
        /// (accept to Finished, ms); handshakes that failed (of which client-certificate
        /// failures, by reason) or timed out; connections closed on a TLS error after it.
        case tlsHandshakes12, tlsHandshakes13, tlsHandshakesOther, tlsResumed, tlsHandshakeMilliseconds
        case tlsHandshakeFailures, tlsHandshakeTimeouts, tlsErrors
        case tlsClientNoCertificate, tlsClientUntrusted, tlsClientRevoked, tlsClientExpired
        /// TLS to upstreams (clusters with `tls:`), by the listener the connection came
        /// in on: handshakes completed, of which resumed; failed (of which the endpoint's
        /// certificate did not verify) or timed out (`connect_timeout`).
        case tlsUpstreamHandshakes, tlsUpstreamResumed, tlsUpstreamFailures, tlsUpstreamUnverified
        /// Completed client handshakes by duration (accept to Finished), one counter per
        /// bucket of `handshakeBucketMilliseconds` (the last: longer than all of them).
        case tlsHandshakeBucket0, tlsHandshakeBucket1, tlsHandshakeBucket2, tlsHandshakeBucket3, tlsHandshakeBucket4
        case tlsHandshakeBucket5, tlsHandshakeBucket6, tlsHandshakeBucket7, tlsHandshakeBucket8, tlsHandshakeBucket9
        case tlsHandshakeBucket10, tlsHandshakeBucketOver

        /// Upper bounds of the handshake-duration buckets (ms), as Prometheus `le` values.
        public static let handshakeBucketMilliseconds: [Int64] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]

        @inline(__always)
        static func handshakeBucket(milliseconds: Int64) -> ListenerCounter {
            var i = 0
            while i < handshakeBucketMilliseconds.count, milliseconds > handshakeBucketMilliseconds[i] { i += 1 }
            return ListenerCounter(rawValue: tlsHandshakeBucket0.rawValue + i).unsafelyUnwrapped
        }

        /// `routes`: connections routed by server name, sent to the default cluster (no
        /// SNI, or a name no route has), closed on a malformed or oversize ClientHello,
        /// or on `inspect_timeout`.
        case sniRouted, sniDefault, sniMalformed, sniOversize, sniTimeouts
        /// `rate_limit`: connections (or UDP sessions, datagrams) refused by reason
        /// (`RateLimitReason` order; connections also count in `refused`), and ones from
        /// an exempt source that skipped the check.
        case rateLimitedNewConnections, rateLimitedPackets, rateLimitedMaxConnections, rateLimitExempt
        /// `relay: kernel`: sessions handed to the kernel's relay, the datagrams it carried
        /// each way (also in `datagramsIn/Out`), and sessions it could not take (its flow
        /// table full), which stayed in user space.
        case kernelSessions, kernelDatagramsIn, kernelDatagramsOut, kernelFallbacks

        public static let tlsClientFailureReasons: [(ListenerCounter, String)] = [
            (.tlsClientNoCertificate, "no_certificate"), (.tlsClientUntrusted, "untrusted"),
            (.tlsClientRevoked, "revoked"), (.tlsClientExpired, "expired"),
        ]

        /// The datagram-drop counters with their reason as `/stats` and `/metrics` name it.
        public static let datagramDropReasons: [(ListenerCounter, String)] = [
            (.dropsNoEndpoint, "no_endpoint"), (.dropsQueueFull, "queue_full"), (.dropsMalformed, "malformed"),
            (.dropsLateReply, "late_reply"), (.dropsSendFailed, "send_failed"),
        ]
    }
    public enum EndpointCounter: Int, CaseIterable, Sendable {
        case active, total, connectFailures, bytesIn, bytesOut
        /// Connect attempts that hit connect_timeout (also in `connectFailures`).
        case connectTimeouts
    }
    /// The worker's own: not tied to a listener or endpoint.
    public enum WorkerCounter: Int, CaseIterable, Sendable {
        /// Loop iterations (one wait each).
        case iterations
        /// Waits the kernel failed (counted; the loop carries on).
        case waitErrors
        /// Requests dropped because the submission queue stayed full (the connection was
        /// closed, or its receive retried).
        case submissionDrops
        /// The most small / large buffers ever in use at once.
        case smallBuffersPeak, largeBuffersPeak
        /// Small / large buffers in use now (sampled once per tick, 100 ms).
        case smallBuffersInUse, largeBuffersInUse
        /// The snapshot generation the worker runs new connections on.
        case adoptedGeneration
        /// Plans still alive: the current one plus older ones with open connections.
        case livePlans
        /// The generation of the oldest plan still alive.
        case oldestPlanGeneration
        /// Access-log records dropped because the writer was behind (its ring was full).
        case accessLogDrops
        /// The user-space filter's verdicts on accepted connections, one per `FilterReason`
        /// in its order (`filterCounter(_:)`).
        case filterNoMatch, filterAllowed, filterNotIP, filterMalformed, filterFragment
        case filterBlockedSourceV4, filterBlockedSourceV6, filterBlockedPortTCP, filterBlockedPortUDP, filterUnreachablePorts
        case filterRateLimitedNewConnections, filterRateLimitedPackets

        public static func filterCounter(_ reason: FilterReason) -> WorkerCounter {
            WorkerCounter(rawValue: filterNoMatch.rawValue + reason.rawValue).unsafelyUnwrapped
        }
    }

    static let cacheLine = 64

    let listenerCount: Int
    let endpointCount: Int
    let block: UnsafeMutableRawPointer
    let blockBytes: Int
    let listenerValues: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    let endpointValues: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    let workerValues: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// `routes`: hits per (listener identity, route position); reserved, resident only
    /// where written.
    let routeHits: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// Routes a listener may have (the parser's limit).
    public static let routesPerListener = 256

    init(listeners: Int = IdentityRegistry.listenerCapacity, endpoints: Int = IdentityRegistry.endpointCapacity) {
        listenerCount = listeners
        endpointCount = endpoints
        let l = listeners * ListenerCounter.allCases.count
        let e = endpoints * EndpointCounter.allCases.count
        let w = WorkerCounter.allCases.count
        let count = l + e + w
        let stride = MemoryLayout<UnsafeAtomic<UInt64>.Storage>.stride
        // Rounded up to whole cache lines: the next worker's block starts on a line of its own.
        blockBytes = max((count * stride + WorkerStats.cacheLine - 1) / WorkerStats.cacheLine, 1) * WorkerStats.cacheLine
        let values = reserve(UnsafeAtomic<UInt64>.Storage.self, blockBytes / stride)
        block = UnsafeMutableRawPointer(values)
        listenerValues = values
        endpointValues = values + l
        workerValues = values + l + e
        routeHits = reserve(UnsafeAtomic<UInt64>.Storage.self, listeners * WorkerStats.routesPerListener)
    }

    deinit {
        munmap(block, blockBytes)
        munmap(routeHits, listenerCount * WorkerStats.routesPerListener * MemoryLayout<UnsafeAtomic<UInt64>.Storage>.stride)
    }

    @inline(__always)
    func addRouteHit(listener: Int, route: Int) {
        WorkerStats.bump(routeHits + (listener * WorkerStats.routesPerListener + route), 1)
    }

    public func routeHits(listener: Int, route: Int) -> UInt64 {
        UnsafeAtomic<UInt64>(at: routeHits + (listener * WorkerStats.routesPerListener + route)).load(ordering: .relaxed)
    }

    @inline(__always)
    static func bump(_ p: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>, _ delta: UInt64) {
        // Single writer: a relaxed load and store, no read-modify-write instruction.
        let counter = UnsafeAtomic<UInt64>(at: p)
        counter.store(counter.load(ordering: .relaxed) &+ delta, ordering: .relaxed)
    }

    @inline(__always)
    func add(_ counter: ListenerCounter, listener: Int, _ delta: UInt64 = 1) {
        WorkerStats.bump(listenerValues + (listener * ListenerCounter.allCases.count + counter.rawValue), delta)
    }

    @inline(__always)
    func add(_ counter: EndpointCounter, endpoint: Int, _ delta: UInt64 = 1) {
        WorkerStats.bump(endpointValues + (endpoint * EndpointCounter.allCases.count + counter.rawValue), delta)
    }

    @inline(__always)
    func add(_ counter: WorkerCounter, _ delta: UInt64 = 1) {
        WorkerStats.bump(workerValues + counter.rawValue, delta)
    }

    @inline(__always)
    func set(_ counter: WorkerCounter, _ value: UInt64) {
        UnsafeAtomic<UInt64>(at: workerValues + counter.rawValue).store(value, ordering: .relaxed)
    }

    public func value(_ counter: ListenerCounter, listener: Int) -> UInt64 {
        UnsafeAtomic<UInt64>(at: listenerValues + (listener * ListenerCounter.allCases.count + counter.rawValue)).load(ordering: .relaxed)
    }

    public func value(_ counter: EndpointCounter, endpoint: Int) -> UInt64 {
        UnsafeAtomic<UInt64>(at: endpointValues + (endpoint * EndpointCounter.allCases.count + counter.rawValue)).load(ordering: .relaxed)
    }

    public func value(_ counter: WorkerCounter) -> UInt64 {
        UnsafeAtomic<UInt64>(at: workerValues + counter.rawValue).load(ordering: .relaxed)
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

    func routeHits(listener: Int, route: Int) -> UInt64 {
        reduce(0) { $0 &+ $1.routeHits(listener: listener, route: route) }
    }
}
