import BPFSteer
import Foundation
import Yams

/// `clusters:` — each cluster: balancer, endpoints (or `dns:`), health check, outlier
/// detection, limits (docs/configuration.md).
extension ConfigWalker {
    mutating func cluster(_ node: Node, _ path: String) -> Config.Cluster? {
        guard let fields = mapping(node, path, keys: [
            "name", "balancer", "hash_key", "endpoints", "health_check", "outlier_detection",
            "max_connections", "slow_start", "table_size", "minimum_ring_size", "hash_balance_factor",
            "choice_count", "active_request_bias", "on_unhealthy", "tls", "dns",
        ]) else { return nil }
        var name: String?
        if let n = fields["name"] {
            name = string(n, "\(path).name")
            if name == "" { fail("\(path).name", "must not be empty") }
        } else {
            fail("\(path).name", "required")
        }
        var endpoints: [Config.Endpoint] = []
        if let n = fields["endpoints"] {
            endpoints = list(n, "\(path).endpoints", required: !emptyClustersAllowed) { walker, item, itemPath in walker.endpoint(item, itemPath) }
            checkEndpoints(endpoints, "\(path).endpoints")
        } else if fields["dns"] == nil, !emptyClustersAllowed {
            fail("\(path).endpoints", "required (or dns:)")
        }
        var cluster = Config.Cluster(name: name ?? "", endpoints: endpoints)
        if let n = fields["dns"] {
            if fields["endpoints"] != nil { fail("\(path).dns", "a cluster takes its endpoints from endpoints: or from dns:, not both") }
            cluster.dns = dnsDiscovery(n, "\(path).dns")
        }
        if let n = fields["balancer"], let b = choice(n, "\(path).balancer", Config.Cluster.Balancer.self) {
            cluster.balancer = b
        }
        let balancer = cluster.balancer
        /// A balancer-specific key set on a cluster whose balancer does not use it.
        func only(_ key: String, _ allowed: Config.Cluster.Balancer...) -> Node? {
            guard let node = fields[key] else { return nil }
            if !allowed.contains(balancer) {
                fail("\(path).\(key)", "applies to balancer \(allowed.map(\.rawValue).joined(separator: " or ")) only, not \(balancer.rawValue)")
                return nil
            }
            return node
        }
        if let n = only("hash_key", .maglev, .ringHash), let k = choice(n, "\(path).hash_key", Config.Cluster.HashKey.self) { cluster.hashKey = k }
        if let n = only("table_size", .maglev), let v = int(n, "\(path).table_size", 2...10_000_019) {
            if !MaglevTable.isPrime(v) {
                fail("\(path).table_size", "\(v) is not prime (e.g. 65537, 655373)")
            } else if v < cluster.endpoints.count * 10 {
                fail("\(path).table_size", "\(v) is too small for \(cluster.endpoints.count) endpoints (at least 10 slots each)")
            } else {
                cluster.tableSize = v
            }
        }
        if let n = only("minimum_ring_size", .ringHash), let v = int(n, "\(path).minimum_ring_size", 1...HashRing.maximumRingSize) { cluster.minimumRingSize = v }
        if let n = only("hash_balance_factor", .ringHash), let v = int(n, "\(path).hash_balance_factor", 100...100_000) { cluster.hashBalanceFactor = v }
        if let n = only("choice_count", .leastRequest), let v = int(n, "\(path).choice_count", 1...100) { cluster.choiceCount = v }
        if let n = only("active_request_bias", .leastRequest) {
            if case .scalar(let s) = n, let v = Double(s.string), v >= 0, v <= 100 {
                cluster.activeRequestBias = v
            } else {
                fail("\(path).active_request_bias", "expected a number from 0 to 100, got \(describe(n))")
            }
        }
        if let n = fields["tls"] { cluster.tls = upstreamTLS(n, "\(path).tls") }
        if let n = fields["health_check"] { cluster.healthCheck = healthCheck(n, "\(path).health_check", cluster: cluster.name) }
        if let n = fields["outlier_detection"] { cluster.outlierDetection = outlierDetection(n, "\(path).outlier_detection") }
        if let n = fields["max_connections"], let v = int(n, "\(path).max_connections", 1...10_000_000) { cluster.maxConnections = v }
        if let n = fields["slow_start"], let d = duration(n, "\(path).slow_start") {
            if d.milliseconds > 0, balancer == .maglev || balancer == .ringHash {
                fail("\(path).slow_start", "applies to round_robin, random and least_request, not \(balancer.rawValue) (hashing must not move keys)")
            }
            cluster.slowStart = d
        }
        if let n = fields["on_unhealthy"], let v = choice(n, "\(path).on_unhealthy", Config.Cluster.OnUnhealthy.self) { cluster.onUnhealthy = v }
        return name == nil ? nil : cluster
    }

    /// What a cluster's endpoint list must hold, written or discovered: at most 65,535
    /// (workers keep endpoint indices in 16 bits, the tried set of a connection), no address
    /// twice, some weight above 0.
    mutating func checkEndpoints(_ endpoints: [Config.Endpoint], _ path: String) {
        if endpoints.count > 65_535 { fail(path, "\(endpoints.count) endpoints; at most 65535 per cluster") }
        var seen: [SocketAddress: Int] = [:]
        for (i, e) in endpoints.enumerated() {
            if let first = seen[e.address] {
                fail("\(path)[\(i)].address", "duplicate endpoint \(e.address) (also endpoints[\(first)])")
            } else {
                seen[e.address] = i
            }
        }
        if !endpoints.isEmpty, endpoints.allSatisfy({ $0.weight == 0 }) {
            fail(path, "at least one endpoint needs a weight above 0")
        }
    }

    mutating func endpoint(_ node: Node, _ path: String) -> Config.Endpoint? {
        guard let fields = mapping(node, path, keys: ["address", "weight", "max_connections"]) else { return nil }
        guard let n = fields["address"] else {
            fail("\(path).address", "required")
            return nil
        }
        let address = self.address(n, "\(path).address")
        var weight = 1
        if let n = fields["weight"], let w = int(n, "\(path).weight", 0...1_000_000) { weight = w }
        guard let address else { return nil }
        var endpoint = Config.Endpoint(address: address, weight: weight)
        if let n = fields["max_connections"], let v = int(n, "\(path).max_connections", 1...10_000_000) { endpoint.maxConnections = v }
        return endpoint
    }


    mutating func outlierDetection(_ node: Node, _ path: String) -> Config.OutlierDetection? {
        guard let fields = mapping(node, path, keys: ["consecutive_failures", "ejection_time", "max_ejection_time", "max_ejection_percent"]) else {
            return nil
        }
        var detection = Config.OutlierDetection()
        if let n = fields["consecutive_failures"], let v = int(n, "\(path).consecutive_failures", 1...1000) { detection.consecutiveFailures = v }
        if let n = fields["ejection_time"], let d = duration(n, "\(path).ejection_time") {
            if d.milliseconds < 1 { fail("\(path).ejection_time", "must be greater than 0") } else { detection.ejectionTime = d }
        }
        if let n = fields["max_ejection_time"], let d = duration(n, "\(path).max_ejection_time") { detection.maxEjectionTime = d }
        if detection.maxEjectionTime < detection.ejectionTime {
            fail("\(path).max_ejection_time", "must not be shorter than ejection_time (\(detection.ejectionTime))")
        }
        if let n = fields["max_ejection_percent"], let v = int(n, "\(path).max_ejection_percent", 0...100) { detection.maxEjectionPercent = v }
        return detection
    }
}
