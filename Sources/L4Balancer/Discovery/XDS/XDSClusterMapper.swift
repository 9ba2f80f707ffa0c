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
        public var cluster: Config.Cluster?
        public var refused: [String] = []
        public var ignored: [String] = []
    }

    /// The EDS resource a cluster reads: its `eds_cluster_config.service_name`, else its name.
    public static func assignmentName(_ cluster: Envoy_Config_Cluster_V3_Cluster) -> String? {
        guard case .type(.eds) = cluster.clusterDiscoveryType else { return nil }
        let service = cluster.edsClusterConfig.serviceName
        return service.isEmpty ? cluster.name : service
    }

    public static func map(_ resource: Envoy_Config_Cluster_V3_Cluster,
                    assignments: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment]) -> Mapped {
        var out = Mapped()
        func refuse(_ reason: String) { out.refused.append(reason) }
        var fields: [(Node, Node)] = [(Node("name"), Node(resource.name))]

        // Where the endpoints come from.
        let assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment?
        switch resource.clusterDiscoveryType {
        case .type(.eds)?: assignment = assignments[assignmentName(resource) ?? resource.name]
        case .type(.static)?, nil: assignment = resource.loadAssignment
        case .type(let other)?:
            let name = [1: "STRICT_DNS", 2: "LOGICAL_DNS", 4: "ORIGINAL_DST"][other.rawValue] ?? "\(other.rawValue)"
            refuse("type \(name) is not supported over xDS (STATIC and EDS are; a DNS name is a file cluster's dns:)")
            assignment = nil
        case .clusterType(let custom)?:
            refuse("cluster_type \(custom.name) (a custom cluster type) is not supported")
            assignment = nil
        }
        var endpointNodes: [Node] = []
        var markings: [SocketAddress: Config.Endpoint.ControlPlaneMark] = [:]
        if let assignment {
            // The lowest priority with an endpoint the control plane calls available serves.
            let lowest = assignment.endpoints.filter { locality in
                locality.lbEndpoints.contains { !isUnavailable($0.healthStatus) }
            }.map(\.priority).min() ?? assignment.endpoints.map(\.priority).min() ?? 0
            for locality in assignment.endpoints {
                for lb in locality.lbEndpoints {
                    guard let address = endpointAddress(lb, refuse: refuse) else { continue }
                    // Priorities: the lowest with an available endpoint serves; the others
                    // stay listed with weight 0 (their counters and health carry on).
                    var weight = lb.hasLoadBalancingWeight ? Int(lb.loadBalancingWeight.value) : 1
                    if locality.priority != lowest { weight = 0 }
                    var node: [(Node, Node)] = [(Node("address"), Node(address.description)), (Node("weight"), Node(String(weight)))]
                    if let perHost = resource.circuitBreakers.perHostThresholds.first(where: { $0.priority == .default }), perHost.hasMaxConnections {
                        node.append((Node("max_connections"), Node(String(perHost.maxConnections.value))))
                    }
                    endpointNodes.append(Node(node))
                    switch lb.healthStatus {
                    case .unhealthy, .timeout: markings[address] = .unhealthy
                    case .draining: markings[address] = .draining
                    default: break
                    }
                }
            }
        }
        fields.append((Node("endpoints"), Node(endpointNodes)))

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
        out.ignored = ignoredFields(resource, refuse: refuse)

        guard out.refused.isEmpty else { return out }
        var walker = ConfigWalker()
        walker.emptyClustersAllowed = true
        let path = "cluster \"\(resource.name)\""
        if resource.name.isEmpty { return Mapped(cluster: nil, refused: ["a cluster without a name"], ignored: []) }
        guard var cluster = walker.cluster(Node(fields), path), walker.errors.isEmpty else {
            out.refused = walker.errors.map(\.description)
            return out
        }
        for i in cluster.endpoints.indices { cluster.endpoints[i].controlPlaneMark = markings[cluster.endpoints[i].address] }
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
        let text = socket.address.contains(":") ? "[\(socket.address)]:\(port)" : "\(socket.address):\(port)"
        guard let address = try? SocketAddress.parse(text).get() else {
            refuse("endpoint \(socket.address): not an IP address (l4lb takes endpoints by address; resolve names in the control plane)")
            return nil
        }
        return address
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
        fields.append((Node("max_ejection_time"), Node(o.hasMaxEjectionTime ? duration(o.maxEjectionTime) : "300s")))
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
                fields.append((Node("expected_statuses"), Node("200-299")))
            }
        case .grpcHealthCheck?: refuse("grpc_health_check is not supported (tcp and http are)"); return nil
        case .customHealthCheck(let c)?: refuse("custom_health_check \(c.name) is not supported (tcp and http are)"); return nil
        case nil: refuse("a health check without a checker (tcp_health_check or http_health_check)"); return nil
        }
        if check.hasAltPort { refuse("health_checks: alt_port is not supported (l4lb checks the endpoint's own port)") }
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
