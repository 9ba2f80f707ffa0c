import Atomics
import CLinux
import EnvoyXDS
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import GRPCProtobuf
import Logging
import NIOPosix
import SwiftProtobuf

typealias DiscoveryRequest = Envoy_Service_Discovery_V3_DiscoveryRequest
typealias DiscoveryResponse = Envoy_Service_Discovery_V3_DiscoveryResponse
typealias EnvoyCluster = Envoy_Config_Cluster_V3_Cluster
typealias EnvoyAssignment = Envoy_Config_Endpoint_V3_ClusterLoadAssignment

/// Clusters from an xDS management server (issue 36): one aggregated (ADS) gRPC stream in the
/// state-of-the-world protocol, CDS with a wildcard subscription and EDS for the clusters
/// that name it. Every response is answered once: an ACK (its version and nonce) only after
/// the snapshot it makes is built, or a NACK (the last accepted version, the response's
/// nonce, and every reason in `error_detail`) that leaves the running config as it was.
/// While the server is away the last accepted clusters keep serving; the stream is opened
/// again after a backoff with jitter and re-subscribes, with the node identity again.
/// Runs on its own task; the snapshot is built off the async executors.
final class XDSClient: @unchecked Sendable {
    static let clusterType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    static let assignmentType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    static let method = MethodDescriptor(
        fullyQualifiedService: "envoy.service.discovery.v3.AggregatedDiscoveryService", method: "StreamAggregatedResources")

    let settings: Config.XDS
    private let logger: Logger
    private let lock = NSLock()
    private var state = Status()
    /// Touched only by the stream task, one response at a time.
    private var clusters: [String: EnvoyCluster] = [:]
    private var assignments: [String: EnvoyAssignment] = [:]
    /// The last EDS response's resources by their bytes: a state-of-the-world response
    /// repeats every assignment, and those whose bytes did not change are not decoded again.
    private var decodedAssignments: [Data: EnvoyAssignment] = [:]
    private var running: [Config.Cluster] = []
    /// Each cluster's last mapping and what it was made from: a cluster whose resource and
    /// assignment did not change is not mapped again.
    private var mapped: [String: MappedCluster] = [:]
    private struct MappedCluster {
        let resource: EnvoyCluster
        /// `XDSClusterMapper.settings(resource)`: an EDS update rebuilds only the endpoints.
        let settings: XDSClusterMapper.Mapped
        let assignment: EnvoyAssignment?
        let result: XDSClusterMapper.Mapped
    }
    private var task: Task<Void, Never>?
    /// Where responses are decoded, mapped and applied: a thread of its own in the idle
    /// class, so a busy control plane never preempts the data plane; on a saturated machine
    /// an update waits at most 250 ms for CPU time (`ControlThread`).
    private let control = ControlThread(name: "l4lb-xds", background: true)
    static let eventLoopGroup: MultiThreadedEventLoopGroup = {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        group.next().execute { _ = CLinux_set_current_thread_nice(10) }
        return group
    }()
    /// Set once, before `start`: makes the running config with these clusters (blocking);
    /// its errors when it could not.
    var apply: (@Sendable ([Config.Cluster]) -> [String]?)?
    /// Set once, before `start`: whether a cluster's endpoint can take connections (healthy,
    /// not ejected); the next EDS priority serves while none of the lowest one's can.
    var isAvailable: (@Sendable (String, SocketAddress) -> Bool)?

    init(settings: Config.XDS, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    var status: Status { lock.withLock { state } }

    func start() {
        task = Task.detached { [self] in await run() }
    }

    func stop() { task?.cancel() }

    // MARK: The stream, and its retries

    private func run() async {
        var failures = 0
        while !Task.isCancelled {
            lock.withLock {
                state.streams += 1
                state.nextAttemptAt = nil
            }
            let answered = ManagedAtomic(false)
            do {
                try await stream { answered.store(true, ordering: .relaxed) }
                record(error: "the server ended the stream")
            } catch {
                record(error: describe(error))
            }
            if Task.isCancelled { break }
            // A stream that got an answer starts the backoff over.
            failures = answered.load(ordering: .relaxed) ? 0 : failures + 1
            let cap = min(settings.maxBackoff.milliseconds, settings.backoff.milliseconds << Int64(min(failures, 20)))
            let delay = cap / 2 + Int64.random(in: 0...max(cap / 2, 1))
            lock.withLock { state.nextAttemptAt = monotonicMilliseconds() + delay }
            try? await Task.sleep(for: .milliseconds(delay))
        }
    }

    private func record(error: String) {
        lock.withLock {
            state.connected = false
            state.connectedSince = nil
            if state.disconnectedAt == nil { state.disconnectedAt = monotonicMilliseconds() }
            state.lastError = error
            state.lastErrorAt = Date()
        }
        // Each attempt is logged (the backoff bounds how often), but not l4lb's own stop.
        if !Task.isCancelled {
            logger.warning("xds stream to the management server ended; the last accepted clusters keep serving", metadata: [
                "server": "\(settings.server)", "error": "\(error)",
            ])
        }
    }

    private func describe(_ error: any Error) -> String {
        if let rpc = error as? RPCError { return "\(rpc.code): \(rpc.message)" }
        return "\(error)"
    }

    private func stream(onAnswer: @escaping @Sendable () -> Void) async throws {
        let (requests, outbox) = AsyncStream.makeStream(of: DiscoveryRequest.self)
        defer { outbox.finish() }
        // Subscribe: every cluster (wildcard), and the assignments already known, from the
        // versions accepted before (a server may then send nothing new).
        // A nonce belongs to the stream that sent it.
        lock.withLock {
            state.clusters.nonce = ""
            state.assignments.nonce = ""
        }
        retry = nil
        var first = request(type: Self.clusterType, names: [], version: lock.withLock { state.clusters.version }, nonce: "")
        first.node = node()
        outbox.yield(first)
        let names = lock.withLock { state.assignments.resourceNames }
        if !names.isEmpty {
            outbox.yield(request(type: Self.assignmentType, names: names, version: lock.withLock { state.assignments.version }, nonce: ""))
        }
        var options = CallOptions.defaults
        options.waitForReady = false
        options.maxResponseMessageBytes = 64 << 20
        try await withGRPCClient(transport: transport()) { client in
            try await client.bidirectionalStreaming(
                request: StreamingClientRequest(of: DiscoveryRequest.self) { writer in
                    for await request in requests { try await writer.write(request) }
                },
                descriptor: Self.method,
                serializer: ProtobufSerializer<DiscoveryRequest>(),
                deserializer: ProtobufDeserializer<DiscoveryResponse>(),
                options: options
            ) { [self] response in
                // The requests end with the responses: a stream the server closes is
                // not held open from this side.
                defer { outbox.finish() }
                // One consumer for the responses and a tick (priority failover as health
                // changes, retries of an update the running config could not take).
                let (events, feed) = AsyncStream.makeStream(of: Event.self)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        defer { feed.finish() }
                        for try await message in response.messages { feed.yield(.response(message)) }
                    }
                    group.addTask {
                        while !Task.isCancelled {
                            try await Task.sleep(for: .milliseconds(500))
                            feed.yield(.tick)
                        }
                    }
                    for await event in events {
                        switch event {
                        case .response(let message):
                            onAnswer()
                            connected()
                            for reply in await control.run({ self.answer(message) }) { outbox.yield(reply) }
                        case .tick:
                            for reply in await control.run({ self.reconsider() }) { outbox.yield(reply) }
                        }
                    }
                    group.cancelAll()
                    while let _ = try await group.next() {}
                }
            }
        }
    }

    private func connected() {
        let first = lock.withLock {
            guard !state.connected else { return false }
            state.connected = true
            state.connectedSince = Date()
            state.disconnectedAt = nil
            return true
        }
        if first { logger.info("xds stream to the management server up", metadata: ["server": "\(settings.server)", "node": "\(settings.nodeID)"]) }
    }

    private func node() -> Envoy_Config_Core_V3_Node {
        var node = Envoy_Config_Core_V3_Node()
        node.id = settings.nodeID
        node.cluster = settings.nodeCluster
        node.userAgentName = "l4lb"
        node.userAgentVersion = "1"
        return node
    }

    private func request(type: String, names: [String], version: String, nonce: String, error: String? = nil) -> DiscoveryRequest {
        var request = DiscoveryRequest()
        request.typeURL = type
        request.resourceNames = names
        request.versionInfo = version
        request.responseNonce = nonce
        if let error {
            request.errorDetail.code = 3  // INVALID_ARGUMENT, as Envoy sends
            request.errorDetail.message = error
        }
        return request
    }

    // MARK: Responses

    /// The requests that answer `response`: its ACK or NACK, and a changed EDS subscription.
    private func answer(_ response: DiscoveryResponse) -> [DiscoveryRequest] {
        switch response.typeURL {
        case Self.clusterType: return answerClusters(response)
        case Self.assignmentType: return answerAssignments(response)
        default:
            logger.warning("xds response of a type l4lb did not ask for; ignored", metadata: ["type": "\(response.typeURL)"])
            return []
        }
    }

    private func answerClusters(_ response: DiscoveryResponse) -> [DiscoveryRequest] {
        lock.withLock { state.clusters.nonce = response.nonce }
        var problems: [String] = []
        var received: [String: EnvoyCluster] = [:]
        for resource in response.resources {
            guard resource.typeURL == Self.clusterType else {
                problems.append("a resource of type \(resource.typeURL) in a CDS response")
                continue
            }
            do {
                let cluster = try EnvoyCluster(serializedBytes: resource.value)
                if received[cluster.name] != nil {
                    problems.append("cluster \"\(cluster.name)\": sent twice in one response")
                } else {
                    received[cluster.name] = cluster
                }
            } catch {
                problems.append("a Cluster that does not decode: \(error)")
            }
        }
        let subscribed = Set(received.values.compactMap(XDSClusterMapper.assignmentName))
        let kept = assignments.filter { subscribed.contains($0.key) }
        if retry?.type == Self.clusterType { retry = nil }
        let outcome = problems.isEmpty ? settle(received, kept) : .refused(problems, retryable: false)
        switch outcome {
        case .refused(let reasons, let retryable):
            if retryable { retry = Retry(type: Self.clusterType, response: response, clusters: received, assignments: kept) }
            let previous = lock.withLock { state.clusters.version }
            return [nack(Self.clusterType, \.clusters, response, previous: previous, reasons: reasons)]
        case .accepted:
            return acceptClusters(response, received, kept)
        }
    }

    /// The ACK of a CDS response whose clusters now run, and the EDS subscription it changes.
    private func acceptClusters(_ response: DiscoveryResponse, _ received: [String: EnvoyCluster], _ kept: [String: EnvoyAssignment]) -> [DiscoveryRequest] {
        clusters = received
        assignments = kept
        let names = Set(received.values.compactMap(XDSClusterMapper.assignmentName)).sorted()
        let (changed, edsVersion, edsNonce) = lock.withLock {
            state.clusters.version = response.versionInfo
            state.clusters.resources = received.count
            state.clusters.resourceNames = received.keys.sorted()
            state.clusters.accepted += 1
            state.clusters.lastAccepted = Date()
            let changed = state.assignments.resourceNames != names
            state.assignments.resourceNames = names
            return (changed, state.assignments.version, state.assignments.nonce)
        }
        var replies = [request(type: Self.clusterType, names: [], version: response.versionInfo, nonce: response.nonce)]
        if changed { replies.append(request(type: Self.assignmentType, names: names, version: edsVersion, nonce: edsNonce)) }
        return replies
    }

    private func answerAssignments(_ response: DiscoveryResponse) -> [DiscoveryRequest] {
        lock.withLock { state.assignments.nonce = response.nonce }
        let subscribed = Set(clusters.values.compactMap(XDSClusterMapper.assignmentName))
        var problems: [String] = []
        var updated = assignments
        var seen = Set<String>()
        var decoded: [Data: EnvoyAssignment] = [:]
        defer { decodedAssignments = decoded }
        for resource in response.resources {
            guard resource.typeURL == Self.assignmentType else {
                problems.append("a resource of type \(resource.typeURL) in an EDS response")
                continue
            }
            do {
                let assignment = try decodedAssignments[resource.value] ?? EnvoyAssignment(serializedBytes: resource.value)
                decoded[resource.value] = assignment
                // Not asked for (a server may send more than the subscription): left out
                // unread.
                guard subscribed.contains(assignment.clusterName) else { continue }
                if !seen.insert(assignment.clusterName).inserted {
                    problems.append("assignment \"\(assignment.clusterName)\": sent twice in one response")
                } else {
                    updated[assignment.clusterName] = assignment
                }
            } catch {
                problems.append("a ClusterLoadAssignment that does not decode: \(error)")
            }
        }
        if retry?.type == Self.assignmentType { retry = nil }
        let outcome = problems.isEmpty ? settle(clusters, updated) : .refused(problems, retryable: false)
        switch outcome {
        case .refused(let reasons, let retryable):
            if retryable { retry = Retry(type: Self.assignmentType, response: response, clusters: clusters, assignments: updated) }
            let previous = lock.withLock { state.assignments.version }
            return [nack(Self.assignmentType, \.assignments, response, previous: previous, reasons: reasons)]
        case .accepted:
            return acceptAssignments(response, updated)
        }
    }

    private func acceptAssignments(_ response: DiscoveryResponse, _ updated: [String: EnvoyAssignment]) -> [DiscoveryRequest] {
        assignments = updated
        let names = lock.withLock {
            state.assignments.version = response.versionInfo
            state.assignments.resources = updated.count
            state.assignments.accepted += 1
            state.assignments.lastAccepted = Date()
            return state.assignments.resourceNames
        }
        return [request(type: Self.assignmentType, names: names, version: response.versionInfo, nonce: response.nonce)]
    }

    // MARK: Ticks

    private enum Event: Sendable {
        case response(DiscoveryResponse)
        case tick
    }

    /// A NACKed update whose resources were fine but which the running config could not
    /// take (a name the file also defines, a capacity, a worker still busy): tried again
    /// with backoff, at once after a reload of the file, and ACKed if it then runs and no
    /// newer response has come.
    private struct Retry {
        let type: String
        let response: DiscoveryResponse
        let clusters: [String: EnvoyCluster]
        let assignments: [String: EnvoyAssignment]
        var at = monotonicMilliseconds() + 1000
        var delay: Int64 = 1000
    }

    private var retry: Retry?
    private let retryNow = ManagedAtomic(false)

    /// After a reload of the file: a refused update is tried again on the next tick.
    func fileReloaded() { retryNow.store(true, ordering: .relaxed) }

    /// On each tick: a due retry, else the serving priorities of clusters with several
    /// (health changes move them), applied when they moved.
    private func reconsider() -> [DiscoveryRequest] {
        let now = monotonicMilliseconds()
        let forced = retryNow.exchange(false, ordering: .relaxed)
        if var pending = retry, forced || now >= pending.at {
            switch settle(pending.clusters, pending.assignments) {
            case .accepted:
                retry = nil
                let current = lock.withLock { pending.type == Self.clusterType ? state.clusters.nonce : state.assignments.nonce }
                guard current == pending.response.nonce else { return [] }
                logger.info("xds update taken on retry", metadata: ["type": "\(pending.type)", "version": "\(pending.response.versionInfo)"])
                return pending.type == Self.clusterType
                    ? acceptClusters(pending.response, pending.clusters, pending.assignments)
                    : acceptAssignments(pending.response, pending.assignments)
            case .refused(_, let retryable):
                pending.delay = min(pending.delay * 2, 30_000)
                pending.at = now + pending.delay
                retry = retryable ? pending : nil
                return []
            }
        }
        guard mapped.values.contains(where: { Set($0.result.priorities).count > 1 }) else { return [] }
        _ = settle(clusters, assignments)
        return []
    }

    private func nack(_ type: String, _ key: WritableKeyPath<Status, Subscription>, _ response: DiscoveryResponse,
                      previous: String, reasons: [String]) -> DiscoveryRequest {
        // One line per reason, bounded: a NACK is read by people and logged by servers.
        var text = reasons.prefix(20).joined(separator: "; ")
        if reasons.count > 20 { text += "; and \(reasons.count - 20) more" }
        lock.withLock {
            state[keyPath: key].rejected += 1
            state[keyPath: key].lastNACK = NACK(version: response.versionInfo, nonce: response.nonce, error: text, at: Date())
        }
        logger.error("xds update refused (NACK); the running config is unchanged", metadata: [
            "type": "\(type)", "version": "\(response.versionInfo)", "errors": "\(text)",
        ])
        let names = type == Self.assignmentType ? lock.withLock { state.assignments.resourceNames } : []
        return request(type: type, names: names, version: previous, nonce: response.nonce, error: text)
    }

    private enum Outcome { case accepted, refused([String], retryable: Bool) }

    /// Maps the resources to l4lb clusters and makes the running config with them; an
    /// unchanged result makes no new snapshot.
    private func settle(_ clusters: [String: EnvoyCluster], _ assignments: [String: EnvoyAssignment]) -> Outcome {
        var mapped: [Config.Cluster] = []
        var refused: [String] = []
        var ignored: [String: [String]] = [:]
        var cache: [String: MappedCluster] = [:]
        for name in clusters.keys.sorted() {
            let resource = clusters[name]!
            let assignment = XDSClusterMapper.assignmentName(resource).flatMap { assignments[$0] }
            let known = self.mapped[name].flatMap { $0.resource == resource ? $0 : nil }
            let settings = known?.settings ?? XDSClusterMapper.settings(resource)
            let result = known.flatMap { $0.assignment == assignment ? $0.result : nil }
                ?? XDSClusterMapper.map(resource, assignments: assignments, settings: settings)
            cache[name] = MappedCluster(resource: resource, settings: settings, assignment: assignment, result: result)
            refused += result.refused.map { $0.hasPrefix("cluster \"") ? $0 : "cluster \"\(name)\": \($0)" }
            if !result.ignored.isEmpty { ignored[name] = result.ignored }
            if result.cluster != nil {
                mapped.append(XDSClusterMapper.serving(result) { [isAvailable] address in isAvailable?(name, address) ?? true })
            }
        }
        self.mapped = cache
        guard refused.isEmpty else { return .refused(refused, retryable: false) }
        lock.withLock { state.ignored = ignored }
        if mapped == running { return .accepted }
        guard let apply else { return .refused(["l4lb is not serving yet"], retryable: true) }
        let errors = apply(mapped)
        if let errors { return .refused(errors, retryable: true) }
        running = mapped
        return .accepted
    }
}
