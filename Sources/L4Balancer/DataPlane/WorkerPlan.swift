import URing

#if canImport(Glibc)
import Glibc
#endif

/// What one worker runs a snapshot with: its balancers (with their per-worker state), the
/// listeners' cluster splits and timeouts in ticks, and the memory the kernel reads at
/// submit time (endpoint addresses, connect timeouts). Built on the worker's own thread
/// when it adopts the snapshot — never per connection. Every connection holds the plan it
/// was opened under (`Connection.plan`, counted in `connections`); a plan that is no longer
/// current is freed when its last connection closes.
final class WorkerPlan {
    let snapshot: Snapshot
    /// Position in the worker's plan table, stored in each of its connections.
    let index: UInt16
    /// Connections opened under this plan and not yet released.
    var connections = 0
    /// Per cluster position (flat, so the accept and connect paths copy no plan structs).
    let balancers: [ClusterBalancer]
    let clusterIDs: [Int]
    let clusterLimits: [Int?]
    let firstEndpoints: [Int]
    let hashKeys: [Config.Cluster.HashKey]
    let slowStartMilliseconds: [Int64]
    let closeOnUnhealthy: [Bool]
    let closesOnUnhealthy: Bool
    /// Clusters with `tls:`: this worker's client contexts (nil: plain TCP to the endpoints,
    /// unless `wantsUpstreamTLS` — a context that failed to build refuses, never sends
    /// plaintext).
    let upstreamTLS: [TLSClientContext?]
    let wantsUpstreamTLS: [Bool]
    /// Per listener identity (`snapshot.listenerIDBound` entries; 0 / nil where absent).
    let idleTicks: [UInt32]
    let sendTicks: [UInt32]
    let clusterSplits: [SmoothRoundRobin?]
    let listenerClusters: [[Int]]
    let listenerLimits: [Int?]
    let connectAttempts: [Int]
    let proxyProtocols: [Config.Listener.ProxyProtocol]
    /// The port each listener is bound to (the user-space filter's `tcp/PORT` check).
    let listenerPorts: [UInt16]
    let listenerIsUDP: [Bool]
    let maxSessions: [Int]
    /// udp: replies that end a session (or a per-packet lease); `UInt32.max` = no limit.
    let proxyResponses: [UInt32]
    /// udp `session: none`: every datagram balanced on its own.
    let perPacket: [Bool]
    /// udp `relay: kernel`, with the program loaded and no per-datagram rate rule for the
    /// workers to apply: sessions the kernel can carry are handed to it, in this table.
    let kernelRelay: [KernelTable?]
    enum KernelTable { case loopback, forwarder }
    /// tcp with `tls:`: this worker's OpenSSL contexts (nil: plain TCP).
    let tlsContexts: [TLSServerContext?]
    /// tcp with `routes:`: the server-name routes.
    let routes: [ServerNameRoutes?]
    /// Listeners with `rate_limit`: what their new connections, sessions and datagrams
    /// are checked against.
    let rateRules: [SourceRateRule?]
    /// Listeners with `tls:` (a context that failed to build refuses, never serves plaintext).
    let isTLS: [Bool]
    /// How long a connection may take to open before it is relayed, in ticks: the TLS
    /// handshake (`handshake_timeout`) or the ClientHello's arrival (`inspect_timeout`).
    let openingTicks: [UInt32]
    /// `connect_timeout` in ticks: it bounds the TLS handshake with an upstream too.
    let connectTicks: [UInt32]
    let connectTimeouts: UnsafeMutablePointer<Timeout>
    /// Per endpoint position.
    let endpointAddresses: UnsafeMutablePointer<sockaddr_storage>
    let endpointAddressLengths: UnsafeMutablePointer<socklen_t>

    /// `previous`: the plan being replaced; clusters whose config did not change keep its
    /// balancers, so a reload does not restart their rotation.
    /// `sessions`: the worker's upstream sessions (for clusters with `tls:`).
    init(snapshot: Snapshot, index: UInt16, worker: Int, previous: WorkerPlan?, sessions: UpstreamSessions) {
        self.snapshot = snapshot
        self.index = index
        balancers = WorkerPlan.balancers(snapshot, worker: worker, previous: previous)
        clusterIDs = snapshot.clusters.map(\.id)
        clusterLimits = snapshot.clusters.map(\.config.maxConnections)
        firstEndpoints = snapshot.clusters.map(\.firstEndpoint)
        hashKeys = snapshot.clusters.map(\.hashKey)
        slowStartMilliseconds = snapshot.clusters.map { $0.config.slowStart.milliseconds }
        closeOnUnhealthy = snapshot.clusters.map { $0.config.onUnhealthy == .close }
        closesOnUnhealthy = closeOnUnhealthy.contains(true)
        wantsUpstreamTLS = snapshot.clusters.map { $0.config.tls != nil }
        upstreamTLS = WorkerPlan.upstreamContexts(snapshot, previous: previous, sessions: sessions)

        let bound = max(snapshot.listenerIDBound, 1)
        idleTicks = WorkerPlan.perListener(snapshot, 0) { Worker.ticks($0.idleTimeoutMilliseconds) }
        sendTicks = WorkerPlan.perListener(snapshot, 0) { Worker.ticks($0.sendTimeoutMilliseconds) }
        clusterSplits = WorkerPlan.perListener(snapshot, nil) { $0.clusters.count > 1 ? SmoothRoundRobin(weights: $0.clusterWeights) : nil }
        listenerClusters = WorkerPlan.perListener(snapshot, []) { $0.clusters }
        listenerLimits = WorkerPlan.perListener(snapshot, nil) { $0.maxConnections }
        connectAttempts = WorkerPlan.perListener(snapshot, 0) { $0.connectAttempts }
        proxyProtocols = WorkerPlan.perListener(snapshot, .none) { $0.proxyProtocol }
        listenerPorts = WorkerPlan.perListener(snapshot, 0) { $0.address.port }
        listenerIsUDP = WorkerPlan.perListener(snapshot, false) { $0.transport == .udp }
        maxSessions = WorkerPlan.perListener(snapshot, 0) { $0.maxSessions }
        perPacket = WorkerPlan.perListener(snapshot, false) { $0.session == .none }
        connectTicks = WorkerPlan.perListener(snapshot, 0) { Worker.ticks($0.connectTimeoutMilliseconds) }
        var responses = [UInt32](repeating: .max, count: bound)
        var kernel = [KernelTable?](repeating: nil, count: bound)
        var tls = [TLSServerContext?](repeating: nil, count: bound)
        var opening = [UInt32](repeating: 0, count: bound)
        var isTLS = [Bool](repeating: false, count: bound)
        var routes = [ServerNameRoutes?](repeating: nil, count: bound)
        var rules = [SourceRateRule?](repeating: nil, count: bound)
        connectTimeouts = .allocate(capacity: bound)
        for listener in snapshot.listeners {
            if let settings = listener.tls {
                tls[listener.id] = WorkerPlan.serverContext(listener, settings, previous: previous)
                opening[listener.id] = Worker.ticks(settings.handshakeTimeout.milliseconds)
                isTLS[listener.id] = true
            }
            if !listener.routes.isEmpty {
                routes[listener.id] = ServerNameRoutes(
                    routes: listener.routes.map { ($0.serverNames, $0.cluster) }, defaultCluster: listener.clusters[0])
                opening[listener.id] = Worker.ticks(listener.inspectTimeoutMilliseconds)
            }
            rules[listener.id] = WorkerPlan.rateRule(listener)
            kernel[listener.id] = WorkerPlan.kernelTable(listener, snapshot, rule: rules[listener.id])
            // A per-packet lease ends after one reply unless told otherwise.
            responses[listener.id] = listener.proxyResponses.map { UInt32($0) } ?? (listener.session == .none ? 1 : .max)
            (connectTimeouts + listener.id).initialize(to: Timeout(milliseconds: listener.connectTimeoutMilliseconds))
        }
        tlsContexts = tls
        self.routes = routes
        rateRules = rules
        self.isTLS = isTLS
        openingTicks = opening
        proxyResponses = responses
        kernelRelay = kernel

        (endpointAddresses, endpointAddressLengths) = WorkerPlan.endpointAddresses(snapshot)
    }

    /// A column by listener identity: `value` of each listener, `absent` where there is none.
    private static func perListener<Value>(_ snapshot: Snapshot, _ absent: Value, _ value: (Snapshot.ListenerPlan) -> Value) -> [Value] {
        var column = [Value](repeating: absent, count: max(snapshot.listenerIDBound, 1))
        for listener in snapshot.listeners { column[listener.id] = value(listener) }
        return column
    }

    /// The clusters' balancers: those whose config did not change keep their state.
    private static func balancers(_ snapshot: Snapshot, worker: Int, previous: WorkerPlan?) -> [ClusterBalancer] {
        var kept: [String: ClusterBalancer] = [:]
        if let previous {
            for (i, cluster) in previous.snapshot.clusters.enumerated() { kept[cluster.name] = previous.balancers[i] }
        }
        return snapshot.clusters.enumerated().map { i, cluster in
            if let balancer = kept[cluster.name],
               let old = previous?.snapshot.clusters.first(where: { $0.name == cluster.name }), old.config == cluster.config {
                return balancer
            }
            return ClusterBalancer(cluster: cluster, seed: UInt64(worker) << 32 | UInt64(i) ^ snapshot.generation << 48)
        }
    }

    /// Clusters with `tls:`: their client contexts. Unchanged settings keep the context
    /// (and the sessions it made stay resumable).
    private static func upstreamContexts(_ snapshot: Snapshot, previous: WorkerPlan?, sessions: UpstreamSessions) -> [TLSClientContext?] {
        snapshot.clusters.map { cluster in
            guard let settings = cluster.config.tls else { return nil }
            if let previous, let i = previous.snapshot.clusters.firstIndex(where: { $0.name == cluster.name }),
               let kept = previous.upstreamTLS[i], kept.settings == settings {
                return kept
            }
            return TLSClientContext(settings, sessions: sessions)
        }
    }

    /// A TLS listener's server context: unchanged settings keep theirs (and the session cache).
    private static func serverContext(_ listener: Snapshot.ListenerPlan, _ settings: Config.TLS, previous: WorkerPlan?) -> TLSServerContext? {
        if let previous, listener.id < previous.tlsContexts.count, let kept = previous.tlsContexts[listener.id],
           let old = previous.snapshot.listeners.first(where: { $0.id == listener.id }),
           old.tls == settings, old.ticketSecret == listener.ticketSecret {
            return kept
        }
        return TLSServerContext(settings, listenerName: listener.name, ticketSecret: listener.ticketSecret)
    }

    /// What the workers check a listener's sources against; nil when XDP enforces the
    /// buckets and there is no `max_connections`, which leaves the workers nothing.
    private static func rateRule(_ listener: Snapshot.ListenerPlan) -> SourceRateRule? {
        guard let limit = listener.rateLimit else { return nil }
        let rule = SourceRateRule(limit, listener: listener.id, bucketsInKernel: listener.rateLimitInKernel)
        return rule.limitsNewSources || rule.packetInterval > 0 ? rule : nil
    }

    /// udp `relay: kernel`: the table its sessions are handed to, when that program is
    /// loaded and no per-datagram rate rule needs the workers to see each datagram.
    private static func kernelTable(_ listener: Snapshot.ListenerPlan, _ snapshot: Snapshot, rule: SourceRateRule?) -> KernelTable? {
        let table: KernelTable = listener.forwardedInKernel ? .forwarder : .loopback
        let loaded = table == .forwarder ? snapshot.forwarder != nil : snapshot.relayFlows != nil
        guard listener.transport == .udp, listener.relay == .kernel, loaded, (rule?.packetInterval ?? 0) == 0 else { return nil }
        return table
    }

    /// The endpoints' socket addresses, by position: what connect reads at submit time.
    private static func endpointAddresses(_ snapshot: Snapshot) -> (UnsafeMutablePointer<sockaddr_storage>, UnsafeMutablePointer<socklen_t>) {
        let addresses = UnsafeMutablePointer<sockaddr_storage>.allocate(capacity: max(snapshot.endpoints.count, 1))
        let lengths = UnsafeMutablePointer<socklen_t>.allocate(capacity: max(snapshot.endpoints.count, 1))
        for (i, endpoint) in snapshot.endpoints.enumerated() {
            lengths[i] = endpoint.address.write(to: addresses + i)
        }
        return (addresses, lengths)
    }

    deinit {
        connectTimeouts.deallocate()
        endpointAddresses.deallocate()
        endpointAddressLengths.deallocate()
    }
}
