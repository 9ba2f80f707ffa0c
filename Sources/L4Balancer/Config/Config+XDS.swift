extension Config {
    /// Clusters from an xDS management server (issue 36): an ADS stream of CDS and EDS in the
    /// state-of-the-world protocol. A listener may name a cluster the file does not define;
    /// it serves once the control plane sends it.
    public struct XDS: Sendable, Equatable {
        /// The management server: `ip:port` or `host:port` (resolved by the gRPC client).
        public var host: String
        public var port: Int
        /// The node identity sent on the first request of every stream.
        public var nodeID: String
        public var nodeCluster = ""
        public var tls: TLS?
        /// The first retry after a stream ends; doubled up to `maxBackoff`, with full jitter.
        public var backoff = ConfigDuration(milliseconds: 500)
        public var maxBackoff: ConfigDuration = .seconds(30)

        /// TLS to the management server: verified against `ca` (the system's roots when
        /// absent); `cert` and `key` together present a client certificate (mTLS).
        public struct TLS: Sendable, Equatable {
            public var ca: String?
            public var cert: String?
            public var key: String?
            /// The name the server's certificate must carry (and the SNI sent); without it,
            /// `server`'s host.
            public var serverName: String?
            public init() {}
        }

        public init(host: String, port: Int, nodeID: String) {
            self.host = host
            self.port = port
            self.nodeID = nodeID
        }

        public var server: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// Names listeners and routes use that no cluster in the config defines: with `xds:`
    /// they are expected from the control plane.
    public var undefinedClusterNames: [String] {
        let defined = Set(clusters.map(\.name))
        var seen = Set<String>()
        var names: [String] = []
        for listener in listeners {
            for name in listener.clusters.map(\.name) + listener.routes.map(\.cluster) where !defined.contains(name) && seen.insert(name).inserted {
                names.append(name)
            }
        }
        return names
    }
}

extension Config {
    /// The file's config with the control plane's clusters added (issue 36). A name both
    /// define is an error, never an override. A listener's cluster that nothing defines yet
    /// (not sent, or removed) leaves its split when the listener has others; when it has
    /// none, it stands as an empty cluster, and connections to it are closed and counted as
    /// finding no endpoint. A discovered `connect_timeout` becomes the connect timeout of
    /// the listeners that send only to that cluster (l4lb's is per listener).
    public func composed(withDiscovered discovered: [Cluster]) -> (config: Config, errors: [String]) {
        var config = self
        var errors: [String] = []
        let written = Set(clusters.map(\.name))
        for cluster in discovered {
            if written.contains(cluster.name) {
                errors.append("cluster \"\(cluster.name)\" is defined in the config file; a discovered cluster may not replace it (rename one)")
            } else {
                config.clusters.append(cluster)
            }
        }
        let byName = Dictionary(config.clusters.map { ($0.name, $0) }) { a, _ in a }
        for i in config.listeners.indices {
            var listener = config.listeners[i]
            let present = listener.clusters.filter { byName[$0.name] != nil }
            if present.contains(where: { $0.weight > 0 }) { listener.clusters = present }
            if listener.clusters.count == 1, let timeout = byName[listener.clusters[0].name]?.connectTimeout {
                listener.connectTimeout = timeout
            }
            config.listeners[i] = listener
        }
        for name in config.undefinedClusterNames {
            var placeholder = Cluster(name: name, endpoints: [])
            placeholder.fromXDS = true
            placeholder.balancer = .random
            config.clusters.append(placeholder)
        }
        return (config, errors)
    }
}
