import BPFSteer

/// The immutable view of the configuration that workers run on: listeners and clusters
/// resolved to positions, every endpoint listed once across clusters (contiguous per
/// cluster, as balancers index them), and each of them carrying its stable identity
/// (`IdentityRegistry`), by which counters, health and drain state are kept. Built by the
/// control plane, tables included; published with one atomic store (`SnapshotStore`); a
/// worker turns it into its own plan, and a connection keeps the plan it was opened under.
public final class Snapshot: @unchecked Sendable {
    /// 1 for the configuration l4lb started with, +1 per successful reload.
    public let generation: UInt64
    public let config: Config
    public let listeners: [ListenerPlan]
    public let clusters: [ClusterPlan]
    /// Every endpoint of every cluster, in cluster order (`ClusterPlan.firstEndpoint` is
    /// where a cluster's endpoints start).
    public let endpoints: [EndpointPlan]
    /// Per endpoint position: its stable identity, and its `max_connections` (Int.max for
    /// none). Raw memory, so a pick reads them without touching an array's header.
    @usableFromInline let endpointIDs: UnsafeMutablePointer<Int32>
    @usableFromInline let endpointLimits: UnsafeMutablePointer<Int>
    /// Per worker, per listener position: the listening socket (SO_REUSEPORT). The worker
    /// owns it once it has adopted this snapshot; empty in snapshots never served.
    let listenerSockets: [[Int32]]
    /// One past the largest listener identity, for tables indexed by it.
    let listenerIDBound: Int
    /// The kernel's UDP relay on `lo`, loaded when a loopback udp listener has `relay: kernel`.
    let relayFlows: UDPRelayFlows?
    /// The kernel forwarder, when a listener it forwards is configured: the workers install
    /// their forwarded udp listeners' sessions in its table.
    let forwarder: KernelRelay?

    public struct ListenerPlan: Sendable {
        /// Stable identity (by name).
        public let id: Int
        public let name: String
        public let address: SocketAddress
        public let clusters: [Int]
        public let clusterWeights: [Int]
        public let connectTimeoutMilliseconds: Int64
        public let connectAttempts: Int
        public let idleTimeoutMilliseconds: Int64
        public let sendTimeoutMilliseconds: Int64
        /// The shared limit across workers, or nil for none.
        public let maxConnections: Int?
        public let proxyProtocol: Config.Listener.ProxyProtocol
        public let transport: Config.Listener.TransportProtocol
        public let maxSessions: Int
        public let proxyResponses: Int?
        public let session: Config.Listener.SessionAffinity
        public let relay: Config.Listener.Relay
        public let tls: Config.TLS?
        /// Server-name routes (cluster positions); empty when the listener has none.
        public let routes: [RoutePlan]
        public let inspectTimeoutMilliseconds: Int64
        /// Per-source limits (the listener's own or the default); nil: none.
        public let rateLimit: Config.RateLimit?
        /// True when the XDP program enforces its token buckets (`KernelRateLimits`); the
        /// workers then apply only `max_connections`.
        public let rateLimitInKernel: Bool
        /// What every worker derives this listener's session-ticket keys from; kept across
        /// reloads (by name), so tickets issued before one still resume after it.
        let ticketSecret: [UInt8]
    }

    /// Whether connections from `listener` can reach a cluster with `tls:`.
    func reachesUpstreamTLS(_ listener: ListenerPlan) -> Bool {
        listener.clusters.contains { clusters[$0].config.tls != nil }
    }

    public struct RoutePlan: Sendable {
        public let serverNames: [String]
        public let cluster: Int
    }

    public struct ClusterPlan: Sendable {
        /// Stable identity (by name).
        public let id: Int
        public let name: String
        public let config: Config.Cluster
        public let balancer: Config.Cluster.Balancer
        public let hashKey: Config.Cluster.HashKey
        public let firstEndpoint: Int
        public let endpointCount: Int
        /// Weights of the cluster's endpoints, in config order.
        public let weights: [Int]
        public let aliasTable: AliasTable
        /// Built here, by the control plane, never on the data path.
        public let maglevTable: MaglevTable?
        public let hashRing: HashRing?
        public let hashBalanceFactor: Int?
        public let choiceCount: Int
        public let activeRequestBias: Double
    }

    public struct EndpointPlan: Sendable {
        /// Stable identity (cluster name + address).
        public let id: Int
        public let cluster: Int
        public let address: SocketAddress
        public let weight: Int
        public let maxConnections: Int?
    }

    /// A snapshot whose identities are positions (for `check` and tools that never reload).
    public convenience init(config: Config) {
        let ids = (
            listeners: Array(config.listeners.indices),
            clusters: Array(config.clusters.indices),
            endpoints: config.clusters.reduce(into: [[Int]]()) { all, c in
                let first = all.reduce(0) { $0 + $1.count }
                all.append(Array(first..<(first + c.endpoints.count)))
            })
        self.init(config: config, generation: 1, ids: ids, previous: nil, listenerSockets: [])
    }

    /// `ids` from `IdentityRegistry.assign`; clusters whose config equals their namesake in
    /// `previous` reuse its tables rather than build them again.
    /// `rateLimitsInKernel`: the listeners whose token buckets XDP enforces.
    init(config: Config, generation: UInt64, ids: (listeners: [Int], clusters: [Int], endpoints: [[Int]]), previous: Snapshot?,
         listenerSockets: [[Int32]], rateLimitsInKernel: Set<String> = [], relayFlows: UDPRelayFlows? = nil,
         forwarder: KernelRelay? = nil) {
        self.config = config
        self.relayFlows = relayFlows
        self.forwarder = forwarder
        self.generation = generation
        self.listenerSockets = listenerSockets
        var previousClusters: [String: ClusterPlan] = [:]
        for cluster in previous?.clusters ?? [] { previousClusters[cluster.name] = cluster }
        var clusterIndex: [String: Int] = [:]
        var clusters: [ClusterPlan] = []
        var endpoints: [EndpointPlan] = []
        for (i, cluster) in config.clusters.enumerated() {
            clusterIndex[cluster.name] = i
            let reused = previousClusters[cluster.name].flatMap { $0.config == cluster ? $0 : nil }
            let members = cluster.endpoints.map { (address: $0.address, weight: $0.weight) }
            clusters.append(ClusterPlan(
                id: ids.clusters[i], name: cluster.name, config: cluster, balancer: cluster.balancer, hashKey: cluster.hashKey,
                firstEndpoint: endpoints.count, endpointCount: cluster.endpoints.count,
                weights: cluster.endpoints.map(\.weight),
                aliasTable: reused?.aliasTable ?? AliasTable(weights: cluster.endpoints.map(\.weight)),
                maglevTable: cluster.balancer == .maglev
                    ? (reused?.maglevTable ?? MaglevTable(endpoints: members, size: cluster.tableSize)) : nil,
                hashRing: cluster.balancer == .ringHash
                    ? (reused?.hashRing ?? HashRing(endpoints: members, minimumRingSize: cluster.minimumRingSize)) : nil,
                hashBalanceFactor: cluster.hashBalanceFactor, choiceCount: cluster.choiceCount,
                activeRequestBias: cluster.activeRequestBias))
            for (k, endpoint) in cluster.endpoints.enumerated() {
                endpoints.append(EndpointPlan(
                    id: ids.endpoints[i][k], cluster: i, address: endpoint.address, weight: endpoint.weight,
                    maxConnections: endpoint.maxConnections))
            }
        }
        self.clusters = clusters
        self.endpoints = endpoints
        endpointIDs = .allocate(capacity: max(endpoints.count, 1))
        endpointLimits = .allocate(capacity: max(endpoints.count, 1))
        for (i, endpoint) in endpoints.enumerated() {
            endpointIDs[i] = Int32(endpoint.id)
            endpointLimits[i] = endpoint.maxConnections ?? Int.max
        }
        var previousSecrets: [String: [UInt8]] = [:]
        for listener in previous?.listeners ?? [] { previousSecrets[listener.name] = listener.ticketSecret }
        self.listeners = config.listeners.enumerated().map { i, listener in
            ListenerPlan(
                id: ids.listeners[i], name: listener.name, address: listener.address,
                clusters: listener.clusters.map { clusterIndex[$0.name]! },
                clusterWeights: listener.clusters.map(\.weight),
                connectTimeoutMilliseconds: listener.connectTimeout.milliseconds,
                connectAttempts: listener.connectAttempts,
                idleTimeoutMilliseconds: listener.idleTimeout.milliseconds,
                sendTimeoutMilliseconds: listener.sendTimeout.milliseconds,
                maxConnections: listener.maxConnections,
                proxyProtocol: listener.proxyProtocol,
                transport: listener.transport,
                maxSessions: listener.maxSessions,
                proxyResponses: listener.proxyResponses,
                session: listener.session,
                relay: listener.relay,
                tls: listener.tls,
                routes: listener.routes.map { RoutePlan(serverNames: $0.serverNames, cluster: clusterIndex[$0.cluster]!) },
                inspectTimeoutMilliseconds: listener.inspectTimeout.milliseconds,
                rateLimit: listener.rateLimit,
                rateLimitInKernel: rateLimitsInKernel.contains(listener.name),
                ticketSecret: listener.tls == nil ? [] : previousSecrets[listener.name].flatMap { $0.isEmpty ? nil : $0 } ?? Snapshot.randomSecret())
        }
        listenerIDBound = (ids.listeners.max() ?? -1) + 1
    }

    static func randomSecret() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    deinit {
        endpointIDs.deallocate()
        endpointLimits.deallocate()
    }

    /// The position of the endpoint `address` of cluster `name`, if this snapshot has it.
    public func endpointPosition(cluster name: String, address: SocketAddress) -> Int? {
        guard let cluster = clusters.first(where: { $0.name == name }) else { return nil }
        return (cluster.firstEndpoint..<(cluster.firstEndpoint + cluster.endpointCount)).first { endpoints[$0].address == address }
    }
}
