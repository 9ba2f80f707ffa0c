import Foundation

/// Stable numbers for what a reload must not confuse: a listener (by name), a cluster (by
/// name) and an endpoint (cluster name + address). Counters, health and drain state are
/// indexed by these, never by a position in the config, so an endpoint a reload does not
/// touch keeps its state, and one that comes back gets its old number again. Numbers are
/// never reused for another identity; the capacities bound what one process can have
/// seen, and a reload past them fails with an error that says so.
public final class IdentityRegistry: @unchecked Sendable {
    public static let listenerCapacity = 1024
    public static let clusterCapacity = 4096
    public static let endpointCapacity = 65536

    public struct EndpointKey: Hashable, Sendable {
        public let cluster: String
        public let address: SocketAddress
    }

    public struct CapacityError: Error, CustomStringConvertible {
        public let description: String
    }

    private let lock = NSLock()
    private var listeners: [String: Int] = [:]
    private var clusters: [String: Int] = [:]
    private var endpoints: [EndpointKey: Int] = [:]
    private var listenerNames: [String] = []
    private var clusterNames: [String] = []
    private var endpointKeys: [EndpointKey] = []

    public init() {}

    /// Numbers for every identity in `config`, assigning new ones to what is new; throws,
    /// assigning nothing, when that would pass a capacity.
    func assign(_ config: Config) throws(CapacityError) -> (listeners: [Int], clusters: [Int], endpoints: [[Int]]) {
        lock.lock()
        defer { lock.unlock() }
        let newListeners = Set(config.listeners.map(\.name).filter { listeners[$0] == nil }).count
        let newClusters = Set(config.clusters.map(\.name).filter { clusters[$0] == nil }).count
        let newEndpoints = config.clusters.reduce(0) { n, c in
            n + c.endpoints.filter { endpoints[EndpointKey(cluster: c.name, address: $0.address)] == nil }.count
        }
        if listenerNames.count + newListeners > IdentityRegistry.listenerCapacity {
            throw CapacityError(description: "listeners: more than \(IdentityRegistry.listenerCapacity) distinct listener names in this process's lifetime; restart l4lb to apply")
        }
        if clusterNames.count + newClusters > IdentityRegistry.clusterCapacity {
            throw CapacityError(description: "clusters: more than \(IdentityRegistry.clusterCapacity) distinct cluster names in this process's lifetime; restart l4lb to apply")
        }
        if endpointKeys.count + newEndpoints > IdentityRegistry.endpointCapacity {
            throw CapacityError(description: "clusters: more than \(IdentityRegistry.endpointCapacity) distinct endpoints in this process's lifetime; restart l4lb to apply")
        }
        let l = config.listeners.map { listener -> Int in
            if let id = listeners[listener.name] { return id }
            listeners[listener.name] = listenerNames.count
            listenerNames.append(listener.name)
            return listenerNames.count - 1
        }
        let c = config.clusters.map { cluster -> Int in
            if let id = clusters[cluster.name] { return id }
            clusters[cluster.name] = clusterNames.count
            clusterNames.append(cluster.name)
            return clusterNames.count - 1
        }
        let e = config.clusters.map { cluster in
            cluster.endpoints.map { endpoint -> Int in
                let key = EndpointKey(cluster: cluster.name, address: endpoint.address)
                if let id = endpoints[key] { return id }
                endpoints[key] = endpointKeys.count
                endpointKeys.append(key)
                return endpointKeys.count - 1
            }
        }
        return (l, c, e)
    }

    /// Every endpoint identity seen so far, by number.
    public var allEndpoints: [EndpointKey] { lock.withLock { endpointKeys } }
    public var allListeners: [String] { lock.withLock { listenerNames } }
}
