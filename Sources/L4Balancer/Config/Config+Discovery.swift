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
