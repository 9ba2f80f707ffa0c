/// The immutable view of the configuration that workers run on: listeners and clusters
/// resolved to indices, every endpoint numbered once across clusters so per-endpoint
/// counters are flat arrays. Built by the control plane; a worker adopts one at the top
/// of its loop and a connection keeps the one it was opened under.
public final class Snapshot: Sendable {
    public let config: Config
    public let listeners: [ListenerPlan]
    public let clusters: [ClusterPlan]
    /// Every endpoint of every cluster, in cluster order (`ClusterPlan.firstEndpoint` is
    /// where a cluster's endpoints start).
    public let endpoints: [EndpointPlan]

    public struct ListenerPlan: Sendable {
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
        /// Connections one worker can hold on this listener (its slab's share).
        public var workerCapacity: Int { maxConnections ?? Config.Listener.defaultCapacity }
        public let proxyProtocol: Config.Listener.ProxyProtocol
    }

    public struct ClusterPlan: Sendable {
        public let name: String
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
        public let cluster: Int
        public let address: SocketAddress
        public let weight: Int
        public let maxConnections: Int?
    }

    public init(config: Config) {
        self.config = config
        var clusterIndex: [String: Int] = [:]
        var clusters: [ClusterPlan] = []
        var endpoints: [EndpointPlan] = []
        for (i, cluster) in config.clusters.enumerated() {
            clusterIndex[cluster.name] = i
            let members = cluster.endpoints.map { (address: $0.address, weight: $0.weight) }
            clusters.append(ClusterPlan(
                name: cluster.name, balancer: cluster.balancer, hashKey: cluster.hashKey,
                firstEndpoint: endpoints.count, endpointCount: cluster.endpoints.count,
                weights: cluster.endpoints.map(\.weight),
                aliasTable: AliasTable(weights: cluster.endpoints.map(\.weight)),
                maglevTable: cluster.balancer == .maglev ? MaglevTable(endpoints: members, size: cluster.tableSize) : nil,
                hashRing: cluster.balancer == .ringHash ? HashRing(endpoints: members, minimumRingSize: cluster.minimumRingSize) : nil,
                hashBalanceFactor: cluster.hashBalanceFactor, choiceCount: cluster.choiceCount,
                activeRequestBias: cluster.activeRequestBias))
            for endpoint in cluster.endpoints {
                endpoints.append(EndpointPlan(cluster: i, address: endpoint.address, weight: endpoint.weight, maxConnections: endpoint.maxConnections))
            }
        }
        self.clusters = clusters
        self.endpoints = endpoints
        self.listeners = config.listeners.map { listener in
            ListenerPlan(
                name: listener.name, address: listener.address,
                clusters: listener.clusters.map { clusterIndex[$0.name]! },
                clusterWeights: listener.clusters.map(\.weight),
                connectTimeoutMilliseconds: listener.connectTimeout.milliseconds,
                connectAttempts: listener.connectAttempts,
                idleTimeoutMilliseconds: listener.idleTimeout.milliseconds,
                sendTimeoutMilliseconds: listener.sendTimeout.milliseconds,
                maxConnections: listener.maxConnections,
                proxyProtocol: listener.proxyProtocol)
        }
    }
}
