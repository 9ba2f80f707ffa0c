import BPFSteer

/// `rate_limit:` — per-source limits (DESIGN §6): a listener's own, or the top-level
/// default every listener without one inherits.
extension Config {
    public struct RateLimit: Sendable, Equatable {
        /// A token bucket: `rate` per second on average, up to `burst` at once.
        public struct Bucket: Sendable, Equatable {
            public var rate: Double
            public var burst: Int

            public init(rate: Double, burst: Int) {
                self.rate = rate
                self.burst = burst
            }

            /// Nanoseconds one unit costs (GCRA's emission interval).
            public var intervalNanoseconds: UInt64 { max(1, UInt64((1e9 / rate).rounded())) }
            /// How far ahead of now a source's bucket may run: `burst` intervals.
            /// Saturates: `1/h` with a burst of 10^8 is centuries ahead, never a wrapped few.
            public var toleranceNanoseconds: UInt64 {
                let (product, overflow) = intervalNanoseconds.multipliedReportingOverflow(by: UInt64(burst))
                return overflow ? .max : product
            }
        }

        /// New TCP connections, or new UDP sessions (`session: client`).
        public var newConnections: Bucket?
        /// UDP datagrams.
        public var packets: Bucket?
        /// Concurrent TCP connections, or UDP sessions, per source.
        public var maxConnections: Int?
        /// Sources are counted per prefix of this length: /32 is one address, /24 a subnet.
        public var prefixV4 = 32
        public var prefixV6 = 64
        /// Never limited.
        public var exempt: [SourcePrefix] = []

        public init() {}

        public var limitsAnything: Bool { newConnections != nil || packets != nil || maxConnections != nil }
    }

    /// Sources the rate limits track at once (shared by every listener and worker; also the
    /// XDP program's LRU size). Beyond it the least recently limited idle source is
    /// forgotten, counted as an eviction.
    public static let defaultRateLimitSources = 65_536
}
