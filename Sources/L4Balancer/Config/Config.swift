/// The validated configuration: what `ConfigParser` produces from YAML, with every default
/// filled in. DESIGN.md §6 is the schema.
public struct Config: Sendable, Equatable {
    public enum Workers: Sendable, Equatable { case auto, count(Int) }

    public var workers: Workers = .auto
    public var drainTimeout: ConfigDuration = .seconds(30)
    public var admin = Admin()
    public var accessLog = AccessLog.off
    public var listeners: [Listener] = []
    public var clusters: [Cluster] = []

    public init() {}

    public struct Admin: Sendable, Equatable {
        public var address = SocketAddress(ip: [127, 0, 0, 1], port: 9901)
        public var token: String?

        public init() {}
    }

    public enum AccessLog: Sendable, Equatable {
        case off
        case on(path: String, format: Format)
        public enum Format: String, Sendable, CaseIterable { case json, text }
    }

    public struct Listener: Sendable, Equatable {
        public enum TransportProtocol: String, Sendable, CaseIterable { case tcp, udp }
        public enum ProxyProtocol: String, Sendable, CaseIterable { case none, v1, v2 }

        public var name: String
        public var address: SocketAddress
        public var transport: TransportProtocol = .tcp
        /// Clusters and their share of new connections; one entry for `cluster: NAME`.
        public var clusters: [WeightedCluster]
        public var connectTimeout: ConfigDuration = .seconds(2)
        public var connectAttempts = 3
        public var idleTimeout: ConfigDuration = .seconds(300)
        public var maxConnections = 100_000
        public var proxyProtocol: ProxyProtocol = .none

        public init(name: String, address: SocketAddress, clusters: [WeightedCluster]) {
            self.name = name
            self.address = address
            self.clusters = clusters
        }
    }

    public struct WeightedCluster: Sendable, Equatable {
        public var name: String
        public var weight: Int

        public init(name: String, weight: Int) {
            self.name = name
            self.weight = weight
        }
    }

    public struct Cluster: Sendable, Equatable {
        public enum Balancer: String, Sendable, CaseIterable {
            case roundRobin = "round_robin"
            case random
            case leastRequest = "least_request"
            case maglev
            case ringHash = "ring_hash"
        }
        public enum HashKey: String, Sendable, CaseIterable {
            case sourceIP = "source_ip"
            case sourceIPPort = "source_ip_port"
            case fiveTuple = "five_tuple"
        }

        public var name: String
        public var balancer: Balancer = .roundRobin
        public var hashKey: HashKey = .sourceIP
        public var endpoints: [Endpoint]
        /// maglev: lookup table size, prime.
        public var tableSize = 65537
        /// ring_hash: points for the smallest weight (see `HashRing`).
        public var minimumRingSize = 1024
        /// ring_hash: bounded load in percent (≥ 100), nil = unbounded.
        public var hashBalanceFactor: Int?
        /// least_request: endpoints sampled per pick.
        public var choiceCount = 2
        /// least_request with unequal weights: weight / (active + 1)^bias.
        public var activeRequestBias = 1.0

        public init(name: String, endpoints: [Endpoint]) {
            self.name = name
            self.endpoints = endpoints
        }
    }

    public struct Endpoint: Sendable, Equatable {
        public var address: SocketAddress
        public var weight: Int = 1

        public init(address: SocketAddress, weight: Int = 1) {
            self.address = address
            self.weight = weight
        }
    }
}
