import BPFSteer
import Foundation
import Yams

/// Turns YAML into a validated `Config`. Strict: unknown keys, wrong types, bad addresses
/// and durations, duplicate names and dangling references are all errors, collected and
/// reported together.
public enum ConfigParser {
    public static func parse(yaml: String) -> Result<Config, ConfigErrors> {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            return .failure(ConfigErrors(errors: [ConfigError(path: "", message: "invalid YAML: \(error)")]))
        }
        var walker = ConfigWalker()
        let config = walker.config(root)
        if walker.errors.isEmpty { return .success(config) }
        return .failure(ConfigErrors(errors: walker.errors))
    }

    /// The largest config file l4lb reads (8 MiB): room for every listener, cluster and
    /// endpoint the identity registry can hold, while a runaway file is refused before it
    /// is parsed, so a reload of one costs neither seconds nor memory.
    public static let maximumFileSize = 8 << 20

    /// `config` (the file's, with the control plane's clusters added) checked across
    /// listeners and clusters as a file would be; the added clusters' health checks take
    /// their listeners' protocol.
    /// `settled`: clusters whose health-check protocol the file already settled.
    public static func checkComposed(_ config: Config, settled: Set<String>) -> Result<Config, ConfigErrors> {
        var walker = ConfigWalker()
        walker.checkProtocolsGiven = settled
        var config = config
        walker.checkAcross(&config)
        if walker.errors.isEmpty { return .success(config) }
        return .failure(ConfigErrors(errors: walker.errors))
    }

    public static func load(path: String) -> Result<Config, ConfigErrors> {
        // Read through one descriptor, never more than the limit + 1 bytes: a symlink's
        // target, a file growing under us or a /proc file are bounded alike.
        guard let file = FileHandle(forReadingAtPath: path) else {
            return .failure(ConfigErrors(errors: [ConfigError(path: path, message: "cannot read file: \(String(cString: strerror(errno)))")]))
        }
        defer { try? file.close() }
        let data: Data
        do {
            data = try file.read(upToCount: maximumFileSize + 1) ?? Data()
        } catch {
            let reason = (error as NSError).localizedFailureReason ?? "cannot read file"
            return .failure(ConfigErrors(errors: [ConfigError(path: path, message: reason)]))
        }
        guard data.count <= maximumFileSize else {
            return .failure(ConfigErrors(errors: [ConfigError(
                path: path, message: "more than \(maximumFileSize) bytes; a config file may be at most \(maximumFileSize) bytes (8 MiB)")]))
        }
        guard let text = String(data: data, encoding: .utf8) else {
            return .failure(ConfigErrors(errors: [ConfigError(path: path, message: "not UTF-8 text")]))
        }
        return parse(yaml: text)
    }
}

/// The YAML walk: each method reads one node at one path and records what is wrong.
struct ConfigWalker {
    var errors: [ConfigError] = []
    /// Clusters whose health check names its `protocol` (the others take their listeners').
    var checkProtocolsGiven: Set<String> = []
    /// With `xds:`, a listener or route may name a cluster the file does not define: the
    /// control plane is expected to send it.
    var clustersFromXDS = false
    /// A cluster from the control plane may have no endpoints yet (its EDS to come).
    var emptyClustersAllowed = false

    mutating func fail(_ path: String, _ message: String) {
        errors.append(ConfigError(path: path, message: message))
    }

    // MARK: Document

    mutating func config(_ root: Node?) -> Config {
        var config = Config()
        guard let root else {
            fail("listeners", "required")
            fail("clusters", "required")
            return config
        }
        guard let fields = mapping(root, "", keys: ["workers", "drain_timeout", "admin", "access_log", "buffers", "listeners", "clusters", "filter", "rate_limit",
                                                         "kernel_relay", "xds"]) else {
            return config
        }
        if let node = fields["workers"] {
            if node.string == "auto" {
                config.workers = .auto
            } else if let n = int(node, "workers", 1...1024) {
                config.workers = .count(n)
            }
        }
        if let node = fields["drain_timeout"], let d = duration(node, "drain_timeout") { config.drainTimeout = d }
        if let node = fields["admin"] { config.admin = admin(node, "admin") }
        if let node = fields["access_log"] { config.accessLog = accessLog(node, "access_log") }
        if let node = fields["buffers"] {
            config.buffers = buffers(node, "buffers")
            checkBufferReservation(config)
        }
        if let node = fields["filter"] { config.filter = filter(node, "filter") }
        if let node = fields["kernel_relay"] { config.kernelRelay = kernelRelay(node, "kernel_relay") }
        if let node = fields["xds"] {
            config.xds = xds(node, "xds")
            clustersFromXDS = true
        }
        if let node = fields["rate_limit"] {
            config.rateLimit = rateLimit(node, "rate_limit", topLevel: true)
            if let n = node["table_size"], let v = int(n, "rate_limit.table_size", 1024...(1 << 24)) {
                var size = 1
                while size < v { size <<= 1 }
                config.rateLimitSources = size
            }
        }

        if let node = fields["clusters"] {
            config.clusters = list(node, "clusters", required: !clustersFromXDS) { walker, item, path in walker.cluster(item, path) }
        } else if !clustersFromXDS {
            fail("clusters", "required")
        }
        var seenClusters: [String: Int] = [:]
        for (i, cluster) in config.clusters.enumerated() {
            if let first = seenClusters[cluster.name] {
                fail("clusters[\(i)].name", "duplicate cluster name \"\(cluster.name)\" (also clusters[\(first)])")
            } else {
                seenClusters[cluster.name] = i
            }
        }

        if let node = fields["listeners"] {
            config.listeners = list(node, "listeners", required: true) { walker, item, path in
                walker.listener(item, path, clusters: seenClusters)
            }
            if case .sequence(let items) = node, items.count == config.listeners.count {
                applyRateLimits(&config, listenerNodes: items.map { $0["rate_limit"] })
            }
        } else {
            fail("listeners", "required")
        }
        checkAcross(&config)
        var seenNames: [String: Int] = [:]
        // One TCP and one UDP listener may share an address (DNS on port 53 does).
        var seenAddresses: [String: Int] = [:]
        for (i, listener) in config.listeners.enumerated() {
            if let first = seenNames[listener.name] {
                fail("listeners[\(i)].name", "duplicate listener name \"\(listener.name)\" (also listeners[\(first)])")
            } else {
                seenNames[listener.name] = i
            }
            let key = "\(listener.transport.rawValue) \(listener.address)"
            if let first = seenAddresses[key] {
                fail("listeners[\(i)].address", "\(listener.address) is already used by listeners[\(first)]")
            } else {
                seenAddresses[key] = i
            }
        }
        return config
    }

    /// The checks across listeners and clusters: run on the file's config, and again on
    /// each config the control plane's clusters make with it (`ConfigParser.checkComposed`).
    mutating func checkAcross(_ config: inout Config) {
        checkCapacities(config)
        checkKernelRelay(config)
        inferHealthCheckProtocols(&config)
        for (i, cluster) in config.clusters.enumerated() where cluster.tls != nil {
            for (l, listener) in config.listeners.enumerated() {
                let uses = listener.clusters.contains { $0.name == cluster.name } || listener.routes.contains { $0.cluster == cluster.name }
                guard uses else { continue }
                if listener.transport == .udp {
                    fail("clusters[\(i)].tls", "TLS to endpoints is for TCP, and listeners[\(l)] is udp")
                } else if !listener.routes.isEmpty {
                    fail("clusters[\(i)].tls", "listeners[\(l)] routes by server name and passes the client's TLS through; it cannot be wrapped in TLS again")
                }
            }
        }
    }

    /// What one process can number (`IdentityRegistry`): `run` and a reload refuse more,
    /// so `check` does too.
    mutating func checkCapacities(_ config: Config) {
        if config.listeners.count > IdentityRegistry.listenerCapacity {
            fail("listeners", "\(config.listeners.count) listeners; at most \(IdentityRegistry.listenerCapacity)")
        }
        if config.clusters.count > IdentityRegistry.clusterCapacity {
            fail("clusters", "\(config.clusters.count) clusters; at most \(IdentityRegistry.clusterCapacity)")
        }
        let endpoints = config.clusters.reduce(0) { $0 + $1.endpoints.count }
        if endpoints > IdentityRegistry.endpointCapacity {
            fail("clusters", "\(endpoints) endpoints in all; at most \(IdentityRegistry.endpointCapacity)")
        }
    }

    mutating func accessLog(_ node: Node, _ path: String) -> Config.AccessLog {
        if node.string == "off" { return .off }
        guard let fields = mapping(node, path, keys: ["path", "format"]) else { return .off }
        var target = "stdout"
        var format = Config.AccessLog.Format.json
        if let n = fields["path"], let p = string(n, "\(path).path") {
            if p.isEmpty { fail("\(path).path", "must not be empty") } else { target = p }
        }
        if let n = fields["format"], let f = choice(n, "\(path).format", Config.AccessLog.Format.self) { format = f }
        return .on(path: target, format: format)
    }

    // MARK: Listeners

    mutating func listener(_ node: Node, _ path: String, clusters known: [String: Int]) -> Config.Listener? {
        guard let fields = mapping(node, path, keys: [
            "name", "address", "protocol", "cluster", "clusters", "connect_timeout", "connect_attempts",
            "idle_timeout", "send_timeout", "max_connections", "proxy_protocol", "rate_limit", "tls", "routes",
            "max_sessions", "proxy_responses", "session", "inspect_timeout", "relay",
        ]) else { return nil }

        let address: SocketAddress?
        if let n = fields["address"] { address = self.address(n, "\(path).address") } else {
            fail("\(path).address", "required")
            address = nil
        }

        var targets: [Config.WeightedCluster] = []
        switch (fields["cluster"], fields["clusters"]) {
        case (.some, .some):
            fail(path, "set either cluster or clusters, not both")
        case (.some(let n), nil):
            if let name = string(n, "\(path).cluster") {
                if known[name] == nil, !clustersFromXDS { fail("\(path).cluster", "unknown cluster \"\(name)\"") }
                targets = [Config.WeightedCluster(name: name, weight: 1)]
            }
        case (nil, .some(let n)):
            targets = list(n, "\(path).clusters", required: true) { walker, item, itemPath in
                walker.weightedCluster(item, itemPath, clusters: known)
            }
            if !targets.isEmpty, targets.allSatisfy({ $0.weight == 0 }) {
                fail("\(path).clusters", "at least one cluster needs a weight above 0")
            }
        case (nil, nil):
            fail("\(path).cluster", "required")
        }

        let name: String
        if let n = fields["name"], let s = string(n, "\(path).name") {
            if s.isEmpty { fail("\(path).name", "must not be empty") }
            name = s
        } else {
            name = address?.description ?? path
        }

        guard let address else { return nil }
        var listener = Config.Listener(name: name, address: address, clusters: targets)
        if let n = fields["protocol"], let p = choice(n, "\(path).protocol", Config.Listener.TransportProtocol.self) {
            listener.transport = p
        }
        if listener.transport == .udp {
            // UDP: sessions per client address (DESIGN §3); TCP's connection settings do not apply.
            listener.idleTimeout = Config.Listener.defaultUDPIdleTimeout
            for key in ["connect_timeout", "connect_attempts", "send_timeout", "max_connections", "proxy_protocol", "tls", "routes", "inspect_timeout"]
            where fields[key] != nil {
                fail("\(path).\(key)", "applies to tcp listeners only")
            }
            if let n = fields["session"], let v = choice(n, "\(path).session", Config.Listener.SessionAffinity.self) { listener.session = v }
            if let n = fields["proxy_responses"], let v = int(n, "\(path).proxy_responses", 0...1_000_000) {
                // 0 (no reply expected) suits per-packet leases only: a session would end
                // with its datagram still in flight.
                if v == 0, listener.session != .none { fail("\(path).proxy_responses", "0 applies to session: none only") }
                listener.proxyResponses = v
            }
            if let n = fields["max_sessions"], let v = int(n, "\(path).max_sessions", 1...1_000_000) { listener.maxSessions = v }
            if let n = fields["relay"], let v = choice(n, "\(path).relay", Config.Listener.Relay.self) {
                // The kernel carries a session's datagrams without the worker seeing them:
                // nothing can count its replies or balance each datagram.
                if v == .kernel, listener.session != .client {
                    fail("\(path).relay", "kernel applies to session: client only")
                } else if v == .kernel, listener.proxyResponses != nil {
                    fail("\(path).relay", "kernel cannot count proxy_responses; leave it unset")
                }
                listener.relay = v
            }
        } else {
            for key in ["max_sessions", "proxy_responses", "session"] where fields[key] != nil {
                fail("\(path).\(key)", "applies to udp listeners only")
            }
            if let n = fields["relay"], let v = choice(n, "\(path).relay", Config.Listener.Relay.self) { listener.relay = v }
        }
        if let n = fields["connect_timeout"], let d = duration(n, "\(path).connect_timeout") {
            if d.milliseconds <= 0 { fail("\(path).connect_timeout", "must be greater than 0") }
            listener.connectTimeout = d
        }
        if let n = fields["connect_attempts"], let v = int(n, "\(path).connect_attempts", 1...16) { listener.connectAttempts = v }
        if let n = fields["idle_timeout"], let d = duration(n, "\(path).idle_timeout") { listener.idleTimeout = d }
        if let n = fields["send_timeout"], let d = duration(n, "\(path).send_timeout") { listener.sendTimeout = d }
        if let n = fields["max_connections"], let v = int(n, "\(path).max_connections", 1...10_000_000) { listener.maxConnections = v }
        if let n = fields["proxy_protocol"], let p = choice(n, "\(path).proxy_protocol", Config.Listener.ProxyProtocol.self) {
            listener.proxyProtocol = p
        }
        if listener.transport == .tcp, let n = fields["tls"] { listener.tls = tls(n, "\(path).tls") }
        if listener.transport == .tcp, let n = fields["routes"] {
            listener.routes = routes(n, "\(path).routes", clusters: known)
            if listener.routes.count > WorkerStats.routesPerListener {
                fail("\(path).routes", "\(listener.routes.count) routes; at most \(WorkerStats.routesPerListener) per listener (a route may list many server_names)")
            }
            if fields["tls"] != nil { fail("\(path).routes", "routes pass TLS through by server name; set either tls or routes, not both") }
        }
        if listener.transport == .tcp, let n = fields["inspect_timeout"], let d = duration(n, "\(path).inspect_timeout") {
            if fields["routes"] == nil { fail("\(path).inspect_timeout", "applies to listeners with routes only") }
            if d.milliseconds <= 0 { fail("\(path).inspect_timeout", "must be greater than 0") } else { listener.inspectTimeout = d }
        }
        if listener.forwardedInKernel { checkKernelListener(listener, fields: fields, path) }
        return listener
    }

    mutating func weightedCluster(_ node: Node, _ path: String, clusters known: [String: Int]) -> Config.WeightedCluster? {
        guard let fields = mapping(node, path, keys: ["name", "weight"]) else { return nil }
        guard let n = fields["name"] else {
            fail("\(path).name", "required")
            return nil
        }
        guard let name = string(n, "\(path).name") else { return nil }
        if known[name] == nil, !clustersFromXDS { fail("\(path).name", "unknown cluster \"\(name)\"") }
        var weight = 1
        if let n = fields["weight"], let w = int(n, "\(path).weight", 0...1_000_000) { weight = w }
        return Config.WeightedCluster(name: name, weight: weight)
    }

    // MARK: Clusters

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

    mutating func bool(_ node: Node, _ path: String) -> Bool? {
        guard case .scalar(let s) = node, ["true", "false"].contains(s.string) else {
            fail(path, "expected true or false, got \(describe(node))")
            return nil
        }
        return s.string == "true"
    }

    // MARK: Scalars and shapes

    /// A mapping's fields by key; unknown and repeated keys are errors.
    mutating func mapping(_ node: Node, _ path: String, keys: Set<String>) -> [String: Node]? {
        guard case .mapping(let mapping) = node else {
            fail(path.isEmpty ? "(document)" : path, "expected a mapping")
            return nil
        }
        var fields: [String: Node] = [:]
        for (keyNode, value) in mapping {
            let key = keyNode.string ?? "\(keyNode)"
            let keyPath = path.isEmpty ? key : "\(path).\(key)"
            if !keys.contains(key) {
                fail(keyPath, "unknown key")
            } else if fields[key] != nil {
                fail(keyPath, "duplicate key")
            } else {
                fields[key] = value
            }
        }
        return fields
    }

    mutating func list<T>(_ node: Node, _ path: String, required: Bool, _ item: (inout ConfigWalker, Node, String) -> T?) -> [T] {
        guard case .sequence(let sequence) = node else {
            fail(path, "expected a list")
            return []
        }
        if required, sequence.isEmpty { fail(path, "must not be empty") }
        var result: [T] = []
        for (i, element) in sequence.enumerated() {
            if let value = item(&self, element, "\(path)[\(i)]") { result.append(value) }
        }
        return result
    }

    /// `controlCharacters`: the string is a payload (a health check's `send`/`expect`), not
    /// a name, address or path.
    mutating func string(_ node: Node, _ path: String, controlCharacters: Bool = false) -> String? {
        guard case .scalar(let scalar) = node else {
            fail(path, "expected a string")
            return nil
        }
        // Names reach logs, metrics labels and C calls; a NUL or newline in one is a mistake
        // or an attack, never meant.
        if !controlCharacters, let complaint = scalar.string.controlCharacterComplaint {
            fail(path, complaint)
            return nil
        }
        return scalar.string
    }

    mutating func int(_ node: Node, _ path: String, _ range: ClosedRange<Int>) -> Int? {
        guard case .scalar(let scalar) = node, let value = Int(scalar.string) else {
            fail(path, "expected an integer, got \(describe(node))")
            return nil
        }
        guard range.contains(value) else {
            fail(path, "\(value) out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return value
    }

    mutating func duration(_ node: Node, _ path: String) -> ConfigDuration? {
        guard case .scalar(let scalar) = node, let d = ConfigDuration.parse(scalar.string) else {
            fail(path, "invalid duration \(describe(node)) (use e.g. 500ms, 2s, 5m, 1h)")
            return nil
        }
        guard d <= ConfigDuration.maximum else {
            fail(path, "\(scalar.string) is longer than the longest duration l4lb takes, \(ConfigDuration.maximum)")
            return nil
        }
        return d
    }

    mutating func address(_ node: Node, _ path: String) -> SocketAddress? {
        guard case .scalar(let scalar) = node else {
            fail(path, "expected ip:port or \"[ipv6]:port\", got \(describe(node)) (quote IPv6 addresses in flow mappings)")
            return nil
        }
        switch SocketAddress.parse(scalar.string) {
        case .success(let a): return a
        case .failure(let e):
            fail(path, e.description)
            return nil
        }
    }

    mutating func choice<T: RawRepresentable & CaseIterable>(_ node: Node, _ path: String, _: T.Type) -> T? where T.RawValue == String {
        guard case .scalar(let scalar) = node, let value = T(rawValue: scalar.string) else {
            let options = T.allCases.map(\.rawValue).joined(separator: ", ")
            fail(path, "must be one of \(options), got \(describe(node))")
            return nil
        }
        return value
    }

    func describe(_ node: Node) -> String {
        switch node {
        case .scalar(let s): return "\"\(s.string)\""
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }
}

