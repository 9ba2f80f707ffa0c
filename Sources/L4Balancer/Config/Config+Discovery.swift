extension Config {
    /// A cluster's endpoints taken from DNS (issue 36): every address of an A or AAAA answer
    /// (with `port`), or the targets of an SRV answer with their ports and weights. Resolved
    /// again on the records' TTL, bounded by `min_ttl` and `max_ttl` (`refresh` when the TTL
    /// is 0); on a timeout, SERVFAIL or NXDOMAIN the last answer keeps serving for `hold`.
    public struct DNSDiscovery: Sendable, Equatable {
        public enum RecordType: String, Sendable, CaseIterable {
            case a = "A"
            case aaaa = "AAAA"
            case srv = "SRV"
        }

        public var name: String
        public var type: RecordType = .a
        /// A and AAAA: the endpoints' port (SRV records carry their own).
        public var port: UInt16?
        /// Empty: the `nameserver` lines of /etc/resolv.conf.
        public var resolvers: [SocketAddress] = []
        public var minTTL: ConfigDuration = .seconds(1)
        public var maxTTL: ConfigDuration = .seconds(300)
        public var refresh: ConfigDuration = .seconds(30)
        public var hold: ConfigDuration = .seconds(300)
        /// How long one resolver has to answer, over UDP and TCP together.
        public var timeout: ConfigDuration = .seconds(2)

        public init(name: String) { self.name = name }
    }
}

extension Config {
    /// What `check` would refuse in `endpoints` had they been written into cluster
    /// `cluster`'s `endpoints:` (discovery checks every answer with it: an answer l4lb
    /// cannot serve is a failed resolution, and the last good one keeps serving); nil if
    /// nothing.
    public func problem(withDiscovered endpoints: [Endpoint], cluster name: String) -> String? {
        guard let cluster = clusters.first(where: { $0.name == name }) else { return nil }
        if endpoints.count > 65_535 { return "\(endpoints.count) endpoints; at most 65535 per cluster" }
        if cluster.balancer == .maglev, cluster.tableSize < endpoints.count * 10 {
            return "\(endpoints.count) endpoints need a maglev table_size of at least \(endpoints.count * 10) (the cluster's is \(cluster.tableSize))"
        }
        for listener in listeners where listener.forwardedInKernel && listener.clusters.contains(where: { $0.name == name }) {
            let family = listener.address.ip.count
            if let wrong = endpoints.first(where: { $0.address.ip.count != family }) {
                return "\(wrong.address) is not of listener \(listener.name)'s family, which the kernel forwards (relay: kernel)"
            }
            if let loopback = endpoints.first(where: { $0.address.isLoopback }) {
                return "\(loopback.address) is on loopback, which listener \(listener.name)'s kernel path cannot reach"
            }
        }
        return nil
    }
}
