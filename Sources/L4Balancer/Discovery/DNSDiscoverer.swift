import Foundation
import Logging

/// Endpoints from DNS for every cluster with `dns:` (issue 36), on one control-plane thread
/// of its own: each name is resolved again when its records' TTL (bounded by `min_ttl` and
/// `max_ttl`; `refresh` for a TTL of 0) runs out. A changed set — compared in a canonical
/// order, so the same records shuffled are no change — is handed to `apply`, which makes a
/// new snapshot through the reload path; an unchanged one makes none. A timeout, SERVFAIL,
/// NXDOMAIN or an empty answer keeps the last set serving for `hold`, then empties the
/// cluster. The data path never resolves or waits.
final class DNSDiscoverer: @unchecked Sendable {
    /// One cluster's source, as `/discovery` shows it.
    struct Source: Sendable {
        let cluster: String
        var settings: Config.DNSDiscovery
        /// The endpoints in use: the last good answer (nil: none yet, or dropped after `hold`),
        /// SRV weights on the serving priority only.
        var endpoints: [Config.Endpoint]?
        /// The last good answer with each endpoint's SRV priority (0 for A and AAAA).
        var answer: [Tiered] = []
        var lastAnswer: Date?
        var ttl: UInt32?
        var overTCP = false
        var lastError: String?
        var lastErrorAt: Date?
        /// Monotonic ms of the first failure since the last good answer.
        var failingSince: Int64?
        var nextAt: Int64 = 0
        var updates: UInt64 = 0
        var failures: UInt64 = 0

        /// `ok`, `stale` (failing, the last answer serving through `hold`), `expired` (failing
        /// past `hold`: no endpoints) or `pending` (no answer yet).
        var state: String {
            if failingSince == nil { return endpoints == nil ? "pending" : "ok" }
            return endpoints == nil ? (lastAnswer == nil ? "pending" : "expired") : "stale"
        }
    }

    /// An endpoint with its SRV weight and priority.
    struct Tiered: Equatable, Sendable {
        let endpoint: Config.Endpoint
        let priority: UInt16
    }

    enum LookupFailure: Error, Equatable, CustomStringConvertible {
        case resolver(DNSResolver.Failure)
        case rcode(UInt8)
        case noRecords
        case unusable(String)

        var description: String {
            switch self {
            case .resolver(let failure): "\(failure)"
            case .rcode(let code): DNSQuery.rcodeName(code)
            case .noRecords: "no records of the type asked for"
            case .unusable(let problem): "an answer l4lb cannot use: \(problem)"
            }
        }

        /// NXDOMAIN or no records: the name is not there (rather than not answered).
        var isAbsence: Bool {
            switch self {
            case .noRecords, .rcode(3): true
            default: false
            }
        }
    }

    private let lock = NSLock()
    private var sources: [String: Source] = [:]
    /// The running config, to check each answer against (`Config.problem(withDiscovered:)`).
    private var config: Config
    private var stopped = false
    private let logger: Logger
    /// Set once, before `start`: makes a snapshot of the current sets; false when it could
    /// not (a reload in progress, workers behind), and it is tried again.
    var apply: (@Sendable () -> Bool)?
    /// Set once, before `start`: whether a cluster's endpoint at an address can take
    /// connections (healthy, not ejected); an SRV answer's next priority serves when none of
    /// the lowest one's can.
    var isAvailable: (@Sendable (String, SocketAddress) -> Bool)?

    init(config: Config, logger: Logger) {
        self.logger = logger
        self.config = config
        update(config: config)
    }

    /// A (re)loaded config: new sources are due at once, removed ones go; a source whose
    /// name, type or port changed starts over (its old answer does not serve the new name),
    /// with `seeded` answers (resolved for the reload) where there are some.
    func update(config: Config, seeded: [String: [Tiered]] = [:]) {
        lock.withLock {
            self.config = config
            var kept: [String: Source] = [:]
            for cluster in config.clusters {
                guard let settings = cluster.dns else { continue }
                var source = sources[cluster.name] ?? Source(cluster: cluster.name, settings: settings)
                let old = source.settings
                if old.name != settings.name || old.type != settings.type || old.port != settings.port || sources[cluster.name] == nil {
                    source = Source(cluster: cluster.name, settings: settings)
                    if let answer = seeded[cluster.name] {
                        source.answer = answer
                        source.endpoints = Self.serving(answer) { _ in true }
                        source.lastAnswer = Date()
                        source.nextAt = monotonicMilliseconds() + settings.minTTL.milliseconds
                    }
                } else if old != settings {
                    source.settings = settings
                    source.nextAt = 0
                }
                kept[cluster.name] = source
            }
            sources = kept
        }
    }

    /// Answers for the `dns:` clusters of `config` that are new or whose name, type or port
    /// changed, resolved now (blocking, each bounded by its timeout), so a reload that adds
    /// one publishes it with its endpoints rather than empty.
    func resolveNew(in config: Config) -> [String: [Tiered]] {
        let fresh = lock.withLock {
            config.clusters.compactMap { cluster -> (String, Config.DNSDiscovery)? in
                guard let settings = cluster.dns else { return nil }
                let old = sources[cluster.name]?.settings
                return old?.name == settings.name && old?.type == settings.type && old?.port == settings.port ? nil : (cluster.name, settings)
            }
        }
        var answers: [String: [Tiered]] = [:]
        for (cluster, settings) in fresh {
            guard case .success(let answer) = Self.lookup(settings),
                  config.problem(withDiscovered: answer.endpoints.map(\.endpoint), cluster: cluster) == nil else { continue }
            answers[cluster] = answer.endpoints
        }
        return answers
    }

    var isEmpty: Bool { lock.withLock { sources.isEmpty } }

    /// The endpoints each `dns:` cluster has now (empty until an answer, and after `hold`).
    var endpoints: [String: [Config.Endpoint]] {
        lock.withLock { sources.mapValues { $0.endpoints ?? [] } }
    }

    var snapshot: [Source] { lock.withLock { sources.values.sorted { $0.cluster < $1.cluster } } }

    /// Resolves every source that is due now; true if a cluster's set changed.
    @discardableResult
    func resolveDue(now: Int64 = monotonicMilliseconds()) -> Bool {
        let due = lock.withLock { sources.values.filter { $0.nextAt <= now }.map { ($0.cluster, $0.settings) } }
        var changed = false
        for (cluster, settings) in due {
            var result = Self.lookup(settings)
            // An answer l4lb cannot serve (too many for the table, the wrong family behind a
            // kernel listener) is a failed resolution: the last good one keeps serving.
            if case .success(let answer) = result,
               let problem = lock.withLock({ config }).problem(withDiscovered: answer.endpoints.map(\.endpoint), cluster: cluster) {
                result = .failure(.unusable(problem))
            }
            let finished = monotonicMilliseconds()
            lock.withLock {
                guard var source = sources[cluster], source.settings == settings else { return }
                switch result {
                case .success(let answer):
                    source.answer = answer.endpoints
                    let endpoints = Self.serving(answer.endpoints) { self.isAvailable?(cluster, $0) ?? true }
                    if source.endpoints != endpoints {
                        changed = true
                        source.updates += 1
                        logger.info("dns: endpoints changed", metadata: [
                            "cluster": "\(cluster)", "name": "\(settings.name)", "endpoints": "\(endpoints.count)",
                        ])
                    }
                    source.endpoints = endpoints
                    source.lastAnswer = Date()
                    source.ttl = answer.ttl
                    source.overTCP = answer.overTCP
                    source.failingSince = nil
                    let ttl = answer.ttl == 0 ? settings.refresh.milliseconds : Int64(answer.ttl) * 1000
                    source.nextAt = finished + min(max(ttl, settings.minTTL.milliseconds), settings.maxTTL.milliseconds)
                case .failure(let failure):
                    source.failures += 1
                    source.lastError = failure.description
                    source.lastErrorAt = Date()
                    let since = source.failingSince ?? finished
                    source.failingSince = since
                    if source.endpoints != nil, finished - since >= settings.hold.milliseconds {
                        source.endpoints = nil
                        changed = true
                        source.updates += 1
                        logger.error("dns: no answer for longer than hold; the cluster's endpoints are removed", metadata: [
                            "cluster": "\(cluster)", "name": "\(settings.name)", "error": "\(failure)",
                        ])
                    } else {
                        logger.warning("dns: resolution failed; the last answer keeps serving", metadata: [
                            "cluster": "\(cluster)", "name": "\(settings.name)", "error": "\(failure)",
                        ])
                    }
                    source.nextAt = finished + max(settings.minTTL.milliseconds, 1000)
                }
                sources[cluster] = source
            }
        }
        return changed
    }

    /// Starts the thread that resolves what is due and applies changed sets.
    func start() {
        let thread = Thread { [self] in
            var pending = false
            // A snapshot that could not be made is tried again, less often each time
            // (100 ms doubling to 5 s): a reload in progress, workers behind.
            var retryAt: Int64 = 0, backoff: Int64 = 100
            while lock.withLock({ !stopped }) {
                if resolveDue() { pending = true }
                if servePriorities() { pending = true }
                let now = monotonicMilliseconds()
                if pending, now >= retryAt, let apply {
                    pending = !apply()
                    if pending {
                        retryAt = now + backoff
                        backoff = min(backoff * 2, 5000)
                    } else {
                        backoff = 100
                    }
                }
                usleep(50_000)
            }
        }
        thread.name = "l4lb-dns"
        thread.start()
    }

    func stop() { lock.withLock { stopped = true } }

    /// The endpoints of an answer as they serve: the lowest priority with an endpoint that
    /// can take connections gets its weights (0 counts as 1), every other weight 0.
    static func serving(_ answer: [Tiered], available: (SocketAddress) -> Bool) -> [Config.Endpoint] {
        let priorities = Set(answer.map(\.priority)).sorted()
        let chosen = priorities.first { p in answer.contains { $0.priority == p && available($0.endpoint.address) } } ?? priorities.first
        return answer.map { tiered in
            var endpoint = tiered.endpoint
            endpoint.weight = tiered.priority == chosen ? max(endpoint.weight, 1) : 0
            return endpoint
        }
    }

    /// Moves each SRV cluster to the priority that should serve now; true if one moved.
    private func servePriorities() -> Bool {
        let tiered = lock.withLock { sources.values.filter { $0.settings.type == .srv && $0.endpoints != nil }.map { ($0.cluster, $0.answer) } }
        var moved = false
        for (cluster, answer) in tiered {
            let endpoints = Self.serving(answer) { self.isAvailable?(cluster, $0) ?? true }
            lock.withLock {
                guard var source = sources[cluster], source.answer == answer, source.endpoints != nil, source.endpoints != endpoints else { return }
                source.endpoints = endpoints
                source.updates += 1
                sources[cluster] = source
                moved = true
                logger.info("dns: the serving SRV priority changed", metadata: ["cluster": "\(cluster)", "name": "\(source.settings.name)"])
            }
        }
        return moved
    }

    /// One resolution of `settings`: the endpoints in canonical order (by address, then
    /// port), the smallest TTL of the records used, and whether the answer came over TCP.
    static func lookup(_ settings: Config.DNSDiscovery) -> Result<(endpoints: [Tiered], ttl: UInt32, overTCP: Bool), LookupFailure> {
        let servers = settings.resolvers.isEmpty ? DNSResolver.systemResolvers() : settings.resolvers
        let resolver = DNSResolver(servers: servers, timeoutMilliseconds: Int(settings.timeout.milliseconds))
        func records(_ name: String, _ type: UInt16) -> Result<(records: [DNSMessage.Record], overTCP: Bool), LookupFailure> {
            switch resolver.resolve(name, type: type) {
            case .failure(let failure): return .failure(.resolver(failure))
            case .success(let (answer, overTCP)):
                guard answer.rcode == 0 else { return .failure(.rcode(answer.rcode)) }
                let matching = answer.records.filter { $0.type == type }
                return matching.isEmpty ? .failure(.noRecords) : .success((matching, overTCP))
            }
        }
        var endpoints: [SocketAddress: Tiered] = [:]
        var ttl = UInt32.max
        var overTCP = false
        switch settings.type {
        case .a, .aaaa:
            let type = settings.type == .a ? DNSMessage.typeA : DNSMessage.typeAAAA
            switch records(settings.name, type) {
            case .failure(let failure): return .failure(failure)
            case .success(let answer):
                overTCP = answer.overTCP
                for record in answer.records {
                    guard case .address(let ip) = record.data else { continue }
                    let address = SocketAddress(ip: ip, port: settings.port ?? 0)
                    endpoints[address] = Tiered(endpoint: Config.Endpoint(address: address), priority: 0)
                    ttl = min(ttl, record.ttl)
                }
            }
        case .srv:
            switch records(settings.name, DNSMessage.typeSRV) {
            case .failure(let failure): return .failure(failure)
            case .success(let answer):
                overTCP = answer.overTCP
                let services = answer.records.compactMap { record -> (priority: UInt16, weight: UInt16, port: UInt16, target: String, ttl: UInt32)? in
                    guard case .service(let priority, let weight, let port, let target) = record.data, port != 0, !target.isEmpty else { return nil }
                    return (priority, weight, port, target, record.ttl)
                }
                // The lowest priority serves (RFC 2782); `serving` gives the others weight 0:
                // health checked, not picked, ready.
                guard !services.isEmpty else { return .failure(.noRecords) }
                var targets: [String: [[UInt8]]] = [:]
                for service in services where targets[service.target] == nil {
                    // A target's addresses: A, else AAAA. A target that does not exist is
                    // left out; one that could not be resolved now fails the whole answer
                    // (the last good one keeps serving) rather than dropping its endpoints.
                    var found = records(service.target, DNSMessage.typeA)
                    if case .failure(let failure) = found, failure.isAbsence { found = records(service.target, DNSMessage.typeAAAA) }
                    if case .failure(let failure) = found, !failure.isAbsence { return .failure(failure) }
                    guard case .success(let addresses) = found else { continue }
                    targets[service.target] = addresses.records.compactMap {
                        guard case .address(let ip) = $0.data else { return nil }
                        ttl = min(ttl, $0.ttl)
                        return ip
                    }
                    overTCP = overTCP || addresses.overTCP
                }
                for service in services {
                    ttl = min(ttl, service.ttl)
                    for ip in targets[service.target] ?? [] {
                        let address = SocketAddress(ip: ip, port: service.port)
                        // The same address and port twice: its best priority, then its largest weight.
                        if let existing = endpoints[address],
                           (existing.priority, -existing.endpoint.weight) <= (service.priority, -Int(service.weight)) { continue }
                        endpoints[address] = Tiered(endpoint: Config.Endpoint(address: address, weight: Int(service.weight)), priority: service.priority)
                    }
                }
            }
        }
        guard !endpoints.isEmpty else { return .failure(.noRecords) }
        let ordered = endpoints.values.sorted { x, y in
            let a = x.endpoint, b = y.endpoint
            return a.address.ip.count != b.address.ip.count ? a.address.ip.count < b.address.ip.count
                : a.address.ip != b.address.ip ? a.address.ip.lexicographicallyPrecedes(b.address.ip) : a.address.port < b.address.port
        }
        return .success((ordered, ttl, overTCP))
    }
}
