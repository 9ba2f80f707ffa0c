import EnvoyXDS
import Foundation
import SwiftProtobuf
import Yams

/// Envoy's Cluster and ClusterLoadAssignment as l4lb clusters (issue 36). Each resource is
/// rewritten as the `clusters:` entry a file would hold and read by the config parser, so a
/// discovered cluster is held to exactly the checks a written one is (a table size that is
/// not prime, a duplicate endpoint, a threshold out of range). What l4lb cannot honour is
/// refused — the NACK names it — and what it leaves aside is listed as ignored.
public enum XDSClusterMapper {
    /// One cluster's result: the l4lb cluster, or why it was refused; and the Envoy fields
    /// it carries that l4lb does not use.
    public struct Mapped: Sendable {
        /// With the lowest priority that has an endpoint the control plane does not mark
        /// serving (`serving` moves it as health changes).
        public var cluster: Config.Cluster?
        public var refused: [String] = []
        public var ignored: [String] = []
        /// Per endpoint of `cluster`: its locality's priority and its own weight.
        public var priorities: [UInt32] = []
        public var weights: [Int] = []
    }

    /// `mapped`'s cluster with the serving priority chosen by health as well: the lowest
    /// with an endpoint neither marked by the control plane nor unavailable (`isAvailable`:
    /// failing its health check, ejected) serves with its weights; the others stand by with
    /// weight 0 (health checked, so the lower one takes back over when it recovers).
    public static func serving(_ mapped: Mapped, isAvailable: (SocketAddress) -> Bool) -> Config.Cluster {
        guard let original = mapped.cluster else { preconditionFailure("serving a refused cluster") }
        let tiers = Set(mapped.priorities).sorted()
        guard tiers.count > 1 else { return original }
        var cluster = original
        let endpoints = cluster.endpoints
        func has(_ priority: UInt32, _ usable: (Config.Endpoint) -> Bool) -> Bool {
            endpoints.indices.contains { mapped.priorities[$0] == priority && usable(endpoints[$0]) }
        }
        guard let serving = tiers.first(where: { p in has(p) { $0.controlPlaneMark == nil && isAvailable($0.address) } }) else {
            return original
        }
        for i in cluster.endpoints.indices { cluster.endpoints[i].weight = mapped.priorities[i] == serving ? mapped.weights[i] : 0 }
        return cluster.endpoints.contains { $0.weight > 0 } ? cluster : original
    }

    /// The EDS resource a cluster reads: its `eds_cluster_config.service_name`, else its name.
    public static func assignmentName(_ cluster: Envoy_Config_Cluster_V3_Cluster) -> String? {
        guard case .type(.eds) = cluster.clusterDiscoveryType else { return nil }
        let service = cluster.edsClusterConfig.serviceName
        return service.isEmpty ? cluster.name : service
    }

    /// `resource` with its endpoints from `assignments` (or its own `load_assignment`);
    /// `settings`: `settings(resource)` made before, when the resource has not changed (an
    /// EDS update then rebuilds only the endpoints).
    public static func map(_ resource: Envoy_Config_Cluster_V3_Cluster,
                           assignments: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment],
                           settings cached: Mapped? = nil) -> Mapped {
        let settings = cached ?? self.settings(resource)
        guard var cluster = settings.cluster, settings.refused.isEmpty else { return settings }
        var out = Mapped(cluster: nil, refused: [], ignored: settings.ignored)
        func refuse(_ reason: String) { out.refused.append(reason) }
        let assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment?
        switch resource.clusterDiscoveryType {
        case .type(.eds)?: assignment = assignments[assignmentName(resource) ?? resource.name]
        default: assignment = resource.loadAssignment
        }

        // Endpoints are built here rather than as YAML nodes (a thousand of them, ten times a
        // second, is the control plane's busiest path); `checkEndpoints` holds them to the
        // file's rules.
        var endpoints: [Config.Endpoint] = []
        var priorities: [UInt32] = []
        var weights: [Int] = []
        if let assignment {
            for (number, name) in [(4, "policy (drop_overloads, overprovisioning_factor)"), (5, "named_endpoints")]
            where fieldNumbers(assignment.unknownFields.data).contains(number) {
                out.ignored.append("assignment \(name)")
            }
            // The lowest priority with an endpoint the control plane calls available serves;
            // the others stay listed with weight 0 (their counters and health carry on).
            let lowest = assignment.endpoints.filter { locality in
                locality.lbEndpoints.contains { !isUnavailable($0.healthStatus) }
            }.map(\.priority).min() ?? assignment.endpoints.map(\.priority).min() ?? 0
            let perHost = resource.circuitBreakers.perHostThresholds.first { $0.priority == .default }
            for locality in assignment.endpoints {
                for lb in locality.lbEndpoints {
                    guard let address = endpointAddress(lb, refuse: refuse) else { continue }
                    let weight = lb.hasLoadBalancingWeight ? Int(lb.loadBalancingWeight.value) : 1
                    if !(1...1_000_000).contains(weight) { refuse("endpoint \(address): load_balancing_weight \(weight) is outside 1...1000000") }
                    if fieldNumbers(lb.endpoint.unknownFields.data).contains(2) {
                        refuse("endpoint \(address): health_check_config (a separate health check address or port) is not supported")
                    }
                    var endpoint = Config.Endpoint(address: address, weight: locality.priority == lowest ? weight : 0)
                    if let perHost, perHost.hasMaxConnections {
                        let limit = Int(perHost.maxConnections.value)
                        if !(1...10_000_000).contains(limit) { refuse("circuit_breakers.per_host_thresholds.max_connections \(limit) is outside 1...10000000") }
                        endpoint.maxConnections = limit
                    }
                    switch lb.healthStatus {
                    case .unhealthy, .timeout: endpoint.controlPlaneMark = .unhealthy
                    case .draining: endpoint.controlPlaneMark = .draining
                    default: break
                    }
                    endpoints.append(endpoint)
                    priorities.append(locality.priority)
                    weights.append(weight)
                }
            }
        }
        guard out.refused.isEmpty else { return out }
        let path = "cluster \"\(resource.name)\""
        var walker = ConfigWalker()
        walker.checkEndpoints(endpoints, "\(path).endpoints")
        guard walker.errors.isEmpty else {
            out.refused = walker.errors.map(\.description)
            return out
        }
        if cluster.balancer == .maglev, cluster.tableSize < endpoints.count * 10 {
            out.refused.append("\(path): \(endpoints.count) endpoints need a maglev_lb_config.table_size of at least \(endpoints.count * 10) (it is \(cluster.tableSize)\(resource.maglevLbConfig.hasTableSize ? "" : ", the default"))")
            return out
        }
        cluster.endpoints = endpoints
        out.priorities = priorities
        out.weights = weights
        out.cluster = cluster
        return out
    }

    /// The cluster-level settings of `resource` as the cluster a file would hold, with no
    /// endpoints (checked by the config parser's cluster walker); refused with the reasons.
    public static func settings(_ resource: Envoy_Config_Cluster_V3_Cluster) -> Mapped {
        var out = Mapped()
        func refuse(_ reason: String) { out.refused.append(reason) }
        if resource.name.isEmpty { return Mapped(cluster: nil, refused: ["a cluster without a name"], ignored: []) }
        var fields: [(Node, Node)] = [(Node("name"), Node(resource.name))]
        switch resource.clusterDiscoveryType {
        case .type(.eds)?, .type(.static)?, nil: break
        case .type(let other)?:
            let name = [1: "STRICT_DNS", 2: "LOGICAL_DNS", 4: "ORIGINAL_DST"][other.rawValue] ?? "\(other.rawValue)"
            refuse("type \(name) is not supported over xDS (STATIC and EDS are; a DNS name is a file cluster's dns:)")
        case .clusterType(let custom)?:
            refuse("cluster_type \(custom.name) (a custom cluster type) is not supported")
        }

        // The balancer and its settings.
        let balancer: String
        switch resource.lbPolicy {
        case .roundRobin: balancer = "round_robin"
        case .leastRequest: balancer = "least_request"
        case .ringHash: balancer = "ring_hash"
        case .random: balancer = "random"
        case .maglev: balancer = "maglev"
        case .clusterProvided, .loadBalancingPolicyConfig, .UNRECOGNIZED:
            let name = resource.lbPolicy == .clusterProvided ? "CLUSTER_PROVIDED"
                : resource.lbPolicy == .loadBalancingPolicyConfig ? "LOAD_BALANCING_POLICY_CONFIG" : "\(resource.lbPolicy.rawValue)"
            refuse("lb_policy \(name) is not supported (ROUND_ROBIN, LEAST_REQUEST, RING_HASH, RANDOM and MAGLEV are)")
            balancer = "round_robin"
        }
        fields.append((Node("balancer"), Node(balancer)))
        var slowStart: Google_Protobuf_Duration?
        switch resource.lbConfig {
        case .maglevLbConfig(let c)? where c.hasTableSize: fields.append((Node("table_size"), Node(String(c.tableSize.value))))
        case .ringHashLbConfig(let c)? where c.hasMinimumRingSize: fields.append((Node("minimum_ring_size"), Node(String(c.minimumRingSize.value))))
        case .leastRequestLbConfig(let c)?:
            if c.hasChoiceCount { fields.append((Node("choice_count"), Node(String(c.choiceCount.value)))) }
            if c.hasSlowStartConfig { slowStart = c.slowStartConfig.slowStartWindow }
        case .roundRobinLbConfig(let c)? where c.hasSlowStartConfig: slowStart = c.slowStartConfig.slowStartWindow
        default: break
        }
        if let slowStart { fields.append((Node("slow_start"), Node(duration(slowStart)))) }
        if resource.hasOutlierDetection {
            for number in fieldNumbers(resource.outlierDetection.unknownFields.data) {
                out.ignored.append("outlier_detection.\(outlierFieldNames[number] ?? "field \(number)")")
            }
        }
        if let limit = resource.circuitBreakers.thresholds.first(where: { $0.priority == .default }), limit.hasMaxConnections {
            fields.append((Node("max_connections"), Node(String(limit.maxConnections.value))))
        }
        if resource.closeConnectionsOnHostHealthFailure { fields.append((Node("on_unhealthy"), Node("close"))) }
        if resource.hasOutlierDetection { fields.append((Node("outlier_detection"), outlierDetection(resource.outlierDetection))) }
        if resource.healthChecks.count > 1 {
            refuse("\(resource.healthChecks.count) health_checks; l4lb runs one per cluster")
        } else if let check = resource.healthChecks.first, let node = healthCheck(check, refuse: refuse) {
            fields.append((Node("health_check"), node))
        }
        out.ignored += ignoredFields(resource, refuse: refuse)
        guard out.refused.isEmpty else { return out }
        var walker = ConfigWalker()
        walker.emptyClustersAllowed = true
        guard var cluster = walker.cluster(Node(fields), "cluster \"\(resource.name)\""), walker.errors.isEmpty else {
            out.refused = walker.errors.map(\.description)
            return out
        }
        if resource.hasConnectTimeout { cluster.connectTimeout = ConfigDuration(milliseconds: milliseconds(resource.connectTimeout)) }
        cluster.fromXDS = true
        out.cluster = cluster
        return out
    }

    static func isUnavailable(_ status: Envoy_Config_Core_V3_HealthStatus) -> Bool {
        status == .unhealthy || status == .draining || status == .timeout
    }

    static func endpointAddress(_ lb: Envoy_Config_Endpoint_V3_LbEndpoint, refuse: (String) -> Void) -> SocketAddress? {
        guard case .endpoint(let endpoint)? = lb.hostIdentifier else {
            refuse("an endpoint given by endpoint_name (named endpoints are not supported)")
            return nil
        }
        guard case .socketAddress(let socket)? = endpoint.address.address else {
            refuse("an endpoint without a socket_address (pipes are not supported)")
            return nil
        }
        guard case .portValue(let port)? = socket.portSpecifier, (1...65535).contains(port) else {
            refuse("endpoint \(socket.address): needs a port_value from 1 to 65535 (named_port is not supported)")
            return nil
        }
        guard let ip = SocketAddress.parseIP(socket.address) else {
            refuse("endpoint \(socket.address): not an IP address (l4lb takes endpoints by address; resolve names in the control plane)")
            return nil
        }
        return SocketAddress(ip: ip, port: UInt16(port))
    }

    static func outlierDetection(_ o: Envoy_Config_Cluster_V3_OutlierDetection) -> Node {
        // Envoy's defaults where a field is absent: 5 failures, 30 s, at most 300 s, 10 %.
        // Connect failures are Envoy's local-origin errors, counted as 5xx unless split.
        let failures = o.splitExternalLocalOriginErrors
            ? (o.hasConsecutiveLocalOriginFailure ? o.consecutiveLocalOriginFailure.value : 5)
            : (o.hasConsecutive5Xx ? o.consecutive5Xx.value : 5)
        var fields: [(Node, Node)] = [
            (Node("consecutive_failures"), Node(String(failures))),
            (Node("max_ejection_percent"), Node(String(o.hasMaxEjectionPercent ? o.maxEjectionPercent.value : 10))),
        ]
        fields.append((Node("ejection_time"), Node(o.hasBaseEjectionTime ? duration(o.baseEjectionTime) : "30s")))
        // Envoy's max_ejection_time defaults to 300 s or base_ejection_time if that is longer.
        let base = o.hasBaseEjectionTime ? milliseconds(o.baseEjectionTime) : 30_000
        fields.append((Node("max_ejection_time"), Node(o.hasMaxEjectionTime ? duration(o.maxEjectionTime) : "\(max(base, 300_000))ms")))
        return Node(fields)
    }

    static func healthCheck(_ check: Envoy_Config_Core_V3_HealthCheck, refuse: (String) -> Void) -> Node? {
        var fields: [(Node, Node)] = []
        switch check.healthChecker {
        case .tcpHealthCheck(let tcp)?:
            let send = payload(tcp.send)
            let expect = tcp.receive.map(payload).reduce([], +)
            if send.isEmpty, expect.isEmpty {
                fields.append((Node("type"), Node("tcp")))
            } else {
                fields.append((Node("type"), Node("send_expect")))
                fields.append((Node("send_hex"), Node(hex(send))))
                fields.append((Node("expect_hex"), Node(hex(expect))))
            }
        case .httpHealthCheck(let http)?:
            fields.append((Node("type"), Node("http")))
            fields.append((Node("path"), Node(http.path.isEmpty ? "/" : http.path)))
            if !http.host.isEmpty { fields.append((Node("host"), Node(http.host))) }
            if let range = http.expectedStatuses.first {
                // Envoy's ranges are half-open: [start, end).
                fields.append((Node("expected_statuses"), Node("\(range.start)-\(range.end - 1)")))
                if http.expectedStatuses.count > 1 { refuse("http_health_check: \(http.expectedStatuses.count) expected_statuses ranges; l4lb takes one") }
            } else {
                fields.append((Node("expected_statuses"), Node("200")))  // Envoy's default: 200 only
            }
        case .grpcHealthCheck?: refuse("grpc_health_check is not supported (tcp and http are)"); return nil
        case .customHealthCheck(let c)?: refuse("custom_health_check \(c.name) is not supported (tcp and http are)"); return nil
        case nil: refuse("a health check without a checker (tcp_health_check or http_health_check)"); return nil
        }
        if check.hasAltPort { refuse("health_checks: alt_port is not supported (l4lb checks the endpoint's own port)") }
        for number in fieldNumbers(check.unknownFields.data) {
            if number == 21 || number == 23 {
                refuse("health_checks: \(number == 21 ? "tls_options" : "transport_socket_match_criteria") is not supported (l4lb's checks take the cluster's transport)")
            }
        }
        if case .httpHealthCheck(let http)? = check.healthChecker, !fieldNumbers(http.unknownFields.data).isEmpty {
            refuse("http_health_check: only path, host and expected_statuses are supported (method, headers, codec and the rest are not)")
        }
        if check.hasTimeout { fields.append((Node("timeout"), Node(duration(check.timeout)))) }
        if check.hasInterval { fields.append((Node("interval"), Node(duration(check.interval)))) }
        if check.hasInitialJitter { fields.append((Node("initial_jitter"), Node(duration(check.initialJitter)))) }
        if check.hasIntervalJitter { fields.append((Node("interval_jitter"), Node(duration(check.intervalJitter)))) }
        if check.hasUnhealthyThreshold { fields.append((Node("unhealthy_threshold"), Node(String(check.unhealthyThreshold.value)))) }
        if check.hasHealthyThreshold { fields.append((Node("healthy_threshold"), Node(String(check.healthyThreshold.value)))) }
        return Node(fields)
    }

    /// Cluster fields l4lb refuses (honouring them is not possible and ignoring them would be
    /// wrong: TLS to the endpoints dropped to plain TCP) or ignores, by field number.
    static let refusedFields: [Int: String] = [
        24: "transport_socket (TLS to the endpoints would be sent as plain TCP)",
        43: "transport_socket_matches (TLS to the endpoints would be sent as plain TCP)",
        59: "transport_socket_matcher (TLS to the endpoints would be sent as plain TCP)",
        41: "load_balancing_policy (an extension policy; use lb_policy)",
        22: "lb_subset_config (subset load balancing)",
    ]
    static let outlierFieldNames: [Int: String] = [
        5: "enforcing_consecutive_5xx", 6: "enforcing_success_rate", 7: "success_rate_minimum_hosts",
        8: "success_rate_request_volume", 9: "success_rate_stdev_factor", 11: "enforcing_consecutive_gateway_failure",
        14: "enforcing_consecutive_local_origin_failure", 15: "enforcing_local_origin_success_rate",
        16: "failure_percentage_threshold", 17: "enforcing_failure_percentage", 19: "failure_percentage_minimum_hosts",
        20: "failure_percentage_request_volume", 22: "max_ejection_time_jitter", 23: "successful_active_health_check_uneject_host",
        25: "always_eject_one_host",
    ]
    static let ignoredFieldNames: [Int: String] = [
        5: "per_connection_buffer_limit_bytes", 9: "max_requests_per_connection", 13: "http_protocol_options",
        14: "http2_protocol_options", 16: "dns_refresh_rate", 17: "dns_lookup_family", 18: "dns_resolvers",
        20: "cleanup_interval", 21: "upstream_bind_config", 25: "metadata", 26: "protocol_selection",
        27: "common_lb_config", 28: "alt_stat_name", 29: "common_http_protocol_options",
        30: "upstream_connection_options", 32: "ignore_health_on_host_removal", 36: "typed_extension_protocol_options",
        40: "filters", 42: "lrs_server", 46: "upstream_http_protocol_options", 49: "track_cluster_stats",
        50: "preconnect_policy", 54: "wait_for_warm_on_init",
    ]

    static func ignoredFields(_ resource: Envoy_Config_Cluster_V3_Cluster, refuse: (String) -> Void) -> [String] {
        var ignored: [String] = []
        for number in fieldNumbers(resource.unknownFields.data) {
            if let reason = refusedFields[number] {
                refuse(reason)
            } else {
                ignored.append(ignoredFieldNames[number] ?? "field \(number)")
            }
        }
        if resource.hasOutlierDetection, resource.outlierDetection.hasInterval { ignored.append("outlier_detection.interval (l4lb ejects on the failure itself)") }
        return ignored
    }

    /// The field numbers in protobuf wire bytes (a message's unknown fields), in order, once each.
    public static func fieldNumbers(_ data: Data) -> [Int] {
        var numbers: [Int] = []
        var i = data.startIndex
        func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while i < data.endIndex, shift < 64 {
                let byte = data[i]
                i += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while i < data.endIndex {
            guard let key = varint() else { break }
            let number = Int(key >> 3)
            if !numbers.contains(number) { numbers.append(number) }
            switch key & 7 {
            case 0: guard varint() != nil else { return numbers }
            case 1: i += 8
            case 2:
                guard let length = varint(), length <= UInt64(data.endIndex - i) else { return numbers }
                i += Int(length)
            case 5: i += 4
            default: return numbers
            }
        }
        return numbers
    }

    static func payload(_ p: Envoy_Config_Core_V3_HealthCheck.Payload) -> [UInt8] {
        switch p.payload {
        case .text(let text)?:
            // Envoy's `text` is hex.
            var bytes: [UInt8] = []
            var chars = Array(text.utf8)
            if chars.count % 2 == 1 { chars.insert(UInt8(ascii: "0"), at: 0) }
            for k in stride(from: 0, to: chars.count, by: 2) {
                guard let b = UInt8(String(decoding: chars[k..<k + 2], as: UTF8.self), radix: 16) else { return Array(text.utf8) }
                bytes.append(b)
            }
            return bytes
        case .binary(let data)?: return Array(data)
        case nil: return []
        }
    }

    static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    static func milliseconds(_ d: Google_Protobuf_Duration) -> Int64 { d.seconds * 1000 + Int64(d.nanos / 1_000_000) }

    static func duration(_ d: Google_Protobuf_Duration) -> String { "\(max(milliseconds(d), 0))ms" }
}
