import BPFSteer

/// The validated configuration: what `ConfigParser` produces from YAML, with every default
/// filled in. DESIGN.md §6 is the schema.
public struct Config: Sendable, Equatable {
    public enum Workers: Sendable, Equatable { case auto, count(Int) }

    public var workers: Workers = .auto
    public var drainTimeout: ConfigDuration = .seconds(30)
    public var admin = Admin()
    public var accessLog = AccessLog.off
    public var buffers = Buffers()
    public var listeners: [Listener] = []
    public var clusters: [Cluster] = []
    public var filter = Filter()
    public var kernelRelay = KernelRelay()
    /// Clusters from an xDS control plane; nil: none.
    public var xds: XDS?
    /// The top-level `rate_limit:`: the default of listeners without their own.
    public var rateLimit: RateLimit?
    /// `rate_limit.table_size`, rounded up to a power of two.
    public var rateLimitSources = Config.defaultRateLimitSources

    public init() {}

    /// The blocklist (DESIGN §7): enforced by the XDP program on `interfaces`, or at accept
    /// in user space where XDP is not attached.
    public struct Filter: Sendable, Equatable {
        public enum Mode: String, Sendable, CaseIterable {
            /// Native XDP, else generic, per interface; user space if XDP cannot load.
            case auto, native, generic
            /// No XDP: the lists are enforced at accept (`off` is the same).
            case userspace, off
        }

        public var interfaces: [String] = []
        public var mode: Mode = .auto
        /// The bpffs directory the maps and links are pinned in.
        public var pinPath = "/sys/fs/bpf/l4lb"
        public var blockSources: [SourcePrefix] = []
        /// Sources that pass even inside a blocked prefix (never overrides `blockPorts`).
        public var allowSources: [SourcePrefix] = []
        public var blockPorts: [PortRule] = []

        public init() {}

        /// True when XDP should be attached at all.
        public var wantsXDP: Bool { !interfaces.isEmpty && mode != .userspace && mode != .off }
    }

    public struct Admin: Sendable, Equatable {
        public var address = SocketAddress(ip: [127, 0, 0, 1], port: 9901)
        public var token: String?
        /// Names (besides IP literals and `localhost`) the API answers to in `Host`.
        public var allowedHosts: Set<String> = []
        /// The API's own budget, apart from the data plane's (taken at start).
        public var maxConnections = 64
        public var idleTimeout = ConfigDuration.seconds(10)
        public var requestTimeout = ConfigDuration.seconds(10)
        /// Request bodies past this are not read (the blocklist's JSON is a few bytes).
        public static let maximumBody = 64 * 1024

        public init() {}
    }

    /// Each worker's receive buffers (the memory contract, docs/configuration.md, "Memory"). Small buffers
    /// carry request/response traffic; a direction whose reads fill one moves to large
    /// buffers. Only buffers that have carried bytes become resident.
    public struct Buffers: Sendable, Equatable {
        public var small = 16_384
        public var smallSize = 16_384
        public var large = 16
        public var largeSize = 1_048_576

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
        public static let defaultIdleTimeoutMilliseconds: Int64 = 300_000
        /// How long a send may make no progress at all (the peer accepts nothing) before
        /// the connection is closed; 0 = never. HAProxy's `timeout client/server` for a
        /// peer that stopped reading.
        public var sendTimeout: ConfigDuration = .seconds(30)
        /// A limit shared by all workers; nil = none (each worker still holds at most
        /// `Listener.defaultCapacity`), and then no shared counter is touched per connection.
        public var maxConnections: Int?
        public static let defaultCapacity = 100_000
        public var proxyProtocol: ProxyProtocol = .none
        /// tcp: terminate TLS; the upstream gets plaintext.
        public var tls: TLS?
        /// tcp: pick the cluster by the ClientHello's server name, without terminating
        /// TLS (`cluster` is the default); how long the ClientHello may take to arrive.
        public var routes: [Route] = []
        public var inspectTimeout: ConfigDuration = .seconds(5)
        public struct Route: Sendable, Equatable {
            public var serverNames: [String]
            public var cluster: String
        }
        /// udp: sessions a worker keeps for this listener; beyond it the longest idle one
        /// is evicted (counted).
        public var maxSessions = 10_000
        /// udp: a session ends after this many replies (nginx's `proxy_responses`); nil =
        /// only on idle.
        public var proxyResponses: Int?
        /// udp: `client` keeps one endpoint per client address; `none` balances every
        /// datagram on its own.
        public var session: SessionAffinity = .client
        /// Per-source limits (its own, or the top-level default); nil = none.
        public var rateLimit: RateLimit?
        public enum SessionAffinity: String, Sendable, CaseIterable { case client, none }
        /// Where a flow's packets are relayed. udp: once a session's endpoint is picked,
        /// `user` (the worker) or `kernel` (a tc program on `lo` rewrites them; on-host
        /// sessions only, others stay in user space). tcp: `kernel` forwards whole flows in
        /// the kernel forwarder (`kernel_relay:`), the workers serving what it leaves.
        public var relay: Relay = .user
        public enum Relay: String, Sendable, CaseIterable { case user, kernel }
        public static let defaultUDPIdleTimeout = ConfigDuration.seconds(30)

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
        public var healthCheck: HealthCheck?
        public var outlierDetection: OutlierDetection?
        /// Concurrent connections to the cluster across workers; nil = unlimited.
        public var maxConnections: Int?
        /// Ramp an endpoint that became healthy from 10% to 100% of its weight over this.
        public var slowStart: ConfigDuration = .zero
        public var onUnhealthy: OnUnhealthy = .keep
        /// TLS to the endpoints; nil: plain TCP.
        public var tls: UpstreamTLS?
        /// Endpoints from DNS instead of `endpoints:` (the list then holds the last answer).
        public var dns: DNSDiscovery?
        /// Sent by an xDS control plane, not written in the file.
        public var fromXDS = false
        /// The control plane's `connect_timeout`: listeners whose only cluster this is take it.
        public var connectTimeout: ConfigDuration?

        public enum OnUnhealthy: String, Sendable, CaseIterable {
            /// Connections already open carry on (HAProxy's default).
            case keep
            case close
        }

        public init(name: String, endpoints: [Endpoint]) {
            self.name = name
            self.endpoints = endpoints
        }
    }

    public struct HealthCheck: Sendable, Equatable {
        /// The longest `timeout` a check may have.
        public static let longestTimeout = ConfigDuration.seconds(300)
        /// How long a start or a reload waits for new endpoints' first checks; those not
        /// checked by then keep their starting state until their check comes.
        public static let longestFirstCheckWait: Int64 = 30_000
        public enum Kind: Sendable, Equatable {
            case tcp
            /// Send bytes, expect the reply to start with bytes.
            case sendExpect(send: [UInt8], expect: [UInt8])
            /// GET `path` with `Host: host`; healthy on a status in `statuses`.
            case http(path: String, host: String?, statuses: ClosedRange<Int>)
            /// A DNS query for `query` of `type`; healthy on a response with an rcode in `rcodes`.
            case dns(query: String, type: UInt16, rcodes: [UInt8])
        }

        /// The transport the check runs over; UDP for clusters behind UDP listeners.
        public var transport: Listener.TransportProtocol = .tcp

        public var kind: Kind = .tcp
        public var interval: ConfigDuration = .seconds(5)
        public var timeout: ConfigDuration = .seconds(1)
        public var healthyThreshold = 2
        public var unhealthyThreshold = 3
        /// Extra delay before the first check, at most this (random per endpoint).
        public var initialJitter: ConfigDuration = .zero
        /// Each interval varies by up to ± this (random).
        public var intervalJitter: ConfigDuration = .zero
        /// Endpoints count as healthy before their first check.
        public var startHealthy = false

        public init() {}
    }

    public struct OutlierDetection: Sendable, Equatable {
        public var consecutiveFailures = 5
        public var ejectionTime: ConfigDuration = .seconds(30)
        public var maxEjectionTime: ConfigDuration = .seconds(300)
        public var maxEjectionPercent = 50

        public init() {}
    }

    public struct Endpoint: Sendable, Equatable {
        public var address: SocketAddress
        public var weight: Int = 1
        /// Concurrent connections to this endpoint across workers; nil = unlimited.
        public var maxConnections: Int?
        /// What an xDS control plane says of the endpoint (EDS `health_status`); nil: nothing.
        public var controlPlaneMark: ControlPlaneMark?

        public enum ControlPlaneMark: String, Sendable {
            /// UNHEALTHY or TIMEOUT: no new connections, as if its health check failed.
            case unhealthy
            /// DRAINING: no new connections; open ones finish.
            case draining
        }

        public init(address: SocketAddress, weight: Int = 1) {
            self.address = address
            self.weight = weight
        }
    }
}
