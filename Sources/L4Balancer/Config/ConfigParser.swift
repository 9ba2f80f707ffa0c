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

