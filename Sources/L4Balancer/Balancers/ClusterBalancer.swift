/// The balancer a worker runs for one cluster. An enum, not a protocol existential, so a
/// pick is a switch and a direct call. Issue-by-issue, each `Config.Cluster.Balancer`
/// gets its case here.
public enum ClusterBalancer {
    case roundRobin(SmoothRoundRobin)

    public init(cluster: Snapshot.ClusterPlan, endpoints: ArraySlice<Snapshot.EndpointPlan>) {
        switch cluster.balancer {
        case .roundRobin, .random, .leastRequest, .maglev, .ringHash:
            self = .roundRobin(SmoothRoundRobin(weights: endpoints.map(\.weight)))
        }
    }

    /// An endpoint index within the cluster, avoiding those in `tried` (bit `i % 64` set).
    @inlinable
    public func pick(flow: FlowKey, tried: UInt64) -> Int? {
        switch self {
        case .roundRobin(let rr):
            return rr.pick(tried: tried)
        }
    }
}

/// What hash-based balancers key on: the client's address and port, and the listener's.
public struct FlowKey {
    public var sourceHash: UInt64
    public var sourcePort: UInt16
    public var destinationPort: UInt16

    public init(sourceHash: UInt64 = 0, sourcePort: UInt16 = 0, destinationPort: UInt16 = 0) {
        self.sourceHash = sourceHash
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
    }
}
