import EnvoyXDS
import Foundation
import L4Balancer
import SwiftProtobuf
import XCTest

/// Envoy's Cluster and ClusterLoadAssignment read as l4lb clusters (issue 36): what maps, what
/// is refused with a reason, what is ignored and named; and how the control plane's clusters
/// join the file's.
final class XDSClusterMapperTests: XCTestCase {
    typealias Cluster = Envoy_Config_Cluster_V3_Cluster
    typealias Assignment = Envoy_Config_Endpoint_V3_ClusterLoadAssignment

    func endpoint(_ ip: String, _ port: UInt32, weight: UInt32? = nil, health: Envoy_Config_Core_V3_HealthStatus = .healthy) -> Envoy_Config_Endpoint_V3_LbEndpoint {
        var lb = Envoy_Config_Endpoint_V3_LbEndpoint()
        lb.endpoint.address.socketAddress.address = ip
        lb.endpoint.address.socketAddress.portValue = port
        if let weight { lb.loadBalancingWeight.value = weight }
        lb.healthStatus = health
        return lb
    }

    func assignment(_ name: String, _ tiers: [(UInt32, [Envoy_Config_Endpoint_V3_LbEndpoint])]) -> Assignment {
        var a = Assignment()
        a.clusterName = name
        a.endpoints = tiers.map { priority, endpoints in
            var locality = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
            locality.priority = priority
            locality.lbEndpoints = endpoints
            return locality
        }
        return a
    }

    func edsCluster(_ name: String, policy: Cluster.LbPolicy = .roundRobin) -> Cluster {
        var c = Cluster()
        c.name = name
        c.type = .eds
        c.lbPolicy = policy
        return c
    }

    func testAnEDSClusterWithItsSettingsMapsToTheClusterAFileWouldHold() throws {
        var c = edsCluster("web", policy: .maglev)
        c.maglevLbConfig.tableSize.value = 65537
        c.connectTimeout = .init(seconds: 1, nanos: 500_000_000)
        c.circuitBreakers.thresholds = [.with { $0.maxConnections.value = 100 }]
        c.circuitBreakers.perHostThresholds = [.with { $0.maxConnections.value = 7 }]
        c.outlierDetection.consecutive5Xx.value = 3
        c.outlierDetection.baseEjectionTime = .init(seconds: 10)
        var check = Envoy_Config_Core_V3_HealthCheck()
        check.interval = .init(seconds: 2)
        check.timeout = .init(nanos: 500_000_000)
        check.unhealthyThreshold.value = 4
        check.healthyThreshold.value = 1
        check.httpHealthCheck.path = "/healthz"
        check.httpHealthCheck.expectedStatuses = [.with { $0.start = 200; $0.end = 300 }]
        c.healthChecks = [check]
        let a = assignment("web", [
            (0, [endpoint("192.0.2.1", 80, weight: 2), endpoint("192.0.2.2", 80, health: .unhealthy), endpoint("192.0.2.3", 80, health: .draining)]),
            (1, [endpoint("192.0.2.9", 80, weight: 5)]),
        ])
        let mapped = XDSClusterMapper.map(c, assignments: ["web": a])
        XCTAssertEqual(mapped.refused, [])
        let cluster = try XCTUnwrap(mapped.cluster)
        XCTAssertTrue(cluster.fromXDS)
        XCTAssertEqual(cluster.balancer, .maglev)
        XCTAssertEqual(cluster.tableSize, 65537)
        XCTAssertEqual(cluster.connectTimeout, ConfigDuration(milliseconds: 1500))
        XCTAssertEqual(cluster.maxConnections, 100)
        XCTAssertEqual(cluster.outlierDetection?.consecutiveFailures, 3)
        XCTAssertEqual(cluster.outlierDetection?.ejectionTime, .seconds(10))
        XCTAssertEqual(cluster.outlierDetection?.maxEjectionPercent, 10, "Envoy's default, not l4lb's")
        XCTAssertEqual(cluster.healthCheck?.kind, .http(path: "/healthz", host: nil, statuses: 200...299), "Envoy's ranges are half-open")
        XCTAssertEqual(cluster.outlierDetection?.maxEjectionTime, .seconds(300))
        XCTAssertEqual(cluster.healthCheck?.interval, .seconds(2))
        XCTAssertEqual(cluster.healthCheck?.unhealthyThreshold, 4)
        XCTAssertEqual(cluster.endpoints.map(\.address.description), ["192.0.2.1:80", "192.0.2.2:80", "192.0.2.3:80", "192.0.2.9:80"])
        XCTAssertEqual(cluster.endpoints.map(\.weight), [2, 1, 1, 0], "priority 1 stands by with weight 0 while priority 0 has an available endpoint")
        XCTAssertEqual(cluster.endpoints.map(\.maxConnections), [7, 7, 7, 7])
        XCTAssertEqual(cluster.endpoints.map(\.controlPlaneMark), [nil, .unhealthy, .draining, nil])
    }

    func testTheNextPriorityServesWhenNoEndpointOfTheLowestIsAvailable() throws {
        let a = assignment("web", [(0, [endpoint("192.0.2.1", 80, health: .unhealthy)]), (1, [endpoint("192.0.2.9", 80, weight: 5)])])
        let cluster = try XCTUnwrap(XDSClusterMapper.map(edsCluster("web"), assignments: ["web": a]).cluster)
        XCTAssertEqual(cluster.endpoints.map(\.weight), [0, 5])
    }

    func testHealthMovesTheServingPriorityAndBack() throws {
        let a = assignment("web", [(0, [endpoint("192.0.2.1", 80, weight: 3)]), (1, [endpoint("192.0.2.9", 80, weight: 5)])])
        let mapped = XDSClusterMapper.map(edsCluster("web"), assignments: ["web": a])
        XCTAssertEqual(mapped.priorities, [0, 1])
        XCTAssertEqual(XDSClusterMapper.serving(mapped) { _ in true }.endpoints.map(\.weight), [3, 0])
        XCTAssertEqual(XDSClusterMapper.serving(mapped) { $0.description != "192.0.2.1:80" }.endpoints.map(\.weight), [0, 5])
        XCTAssertEqual(XDSClusterMapper.serving(mapped) { _ in false }.endpoints.map(\.weight), [3, 0], "nothing available: as mapped")
    }

    func testAnEDSClusterWithoutItsAssignmentYetIsEmptyNotRefused() throws {
        let mapped = XDSClusterMapper.map(edsCluster("web"), assignments: [:])
        XCTAssertEqual(mapped.refused, [])
        XCTAssertEqual(mapped.cluster?.endpoints, [])
    }

    func testWhatL4lbCannotHonourIsRefusedWithTheReason() {
        func refused(_ change: (inout Cluster) -> Void, assignment: Assignment? = nil) -> String {
            var c = edsCluster("web")
            change(&c)
            return XDSClusterMapper.map(c, assignments: ["web": assignment ?? self.assignment("web", [(0, [endpoint("192.0.2.1", 80)])])])
                .refused.joined(separator: "; ")
        }
        XCTAssertTrue(refused { $0.lbPolicy = .clusterProvided }.contains("lb_policy CLUSTER_PROVIDED is not supported"))
        XCTAssertTrue(refused { $0.type = .strictDns }.contains("type STRICT_DNS is not supported"))
        XCTAssertTrue(refused { $0.lbPolicy = .maglev; $0.maglevLbConfig.tableSize.value = 1000 }.contains("table_size: 1000 is not prime"))
        XCTAssertTrue(refused { $0.healthChecks = [.with { $0.grpcHealthCheck.serviceName = "x" }] }.contains("grpc_health_check is not supported"))
        XCTAssertTrue(refused { _ in }.isEmpty)
        let named = assignment("web", [(0, [endpoint("backend.example", 80)])])
        XCTAssertTrue(refused({ _ in }, assignment: named).contains("not an IP address"))
        let twice = assignment("web", [(0, [endpoint("192.0.2.1", 80), endpoint("192.0.2.1", 80)])])
        XCTAssertTrue(refused({ _ in }, assignment: twice).contains("duplicate endpoint 192.0.2.1:80"))
    }

    /// Fields the trimmed messages leave out arrive as unknown fields: TLS to the endpoints is
    /// refused (it would silently become plain TCP), metadata is ignored and named.
    func testUnknownFieldsAreRefusedOrNamedAsIgnored() throws {
        var bytes = try edsCluster("web").serializedBytes() as [UInt8]
        bytes += [0xCA, 0x01, 0x00]  // field 25 (metadata), empty
        let metadata = try Cluster(serializedBytes: bytes)
        XCTAssertEqual(XDSClusterMapper.fieldNumbers(metadata.unknownFields.data), [25])
        let ignored = XDSClusterMapper.map(metadata, assignments: [:])
        XCTAssertEqual(ignored.refused, [])
        XCTAssertEqual(ignored.ignored, ["metadata"])
        bytes += [0xC2, 0x01, 0x02, 0x0A, 0x00]  // field 24 (transport_socket) holding a name
        let tls = XDSClusterMapper.map(try Cluster(serializedBytes: bytes), assignments: [:])
        XCTAssertTrue(tls.refused.joined().contains("transport_socket"), "\(tls.refused)")
    }

    func testDiscoveredClustersJoinTheFileAndANameCollisionIsAnError() throws {
        let file = try ConfigParser.parse(yaml: """
            xds: { server: "127.0.0.1:18000", node_id: n1 }
            listeners:
              - { name: a, address: "127.0.0.1:8080", cluster: web }
              - { name: b, address: "127.0.0.1:8081", clusters: [{ name: local, weight: 1 }, { name: gone, weight: 1 }] }
            clusters: [{ name: local, endpoints: [{ address: "127.0.0.1:9001" }] }]
            """).get()
        XCTAssertEqual(file.xds?.nodeID, "n1")
        XCTAssertEqual(file.undefinedClusterNames, ["web", "gone"])
        var web = Config.Cluster(name: "web", endpoints: [Config.Endpoint(address: try SocketAddress.parse("192.0.2.1:80").get())])
        web.connectTimeout = .seconds(7)
        let (config, errors) = file.composed(withDiscovered: [web])
        XCTAssertEqual(errors, [])
        XCTAssertEqual(config.listeners[0].connectTimeout, .seconds(7), "a listener of one discovered cluster takes its connect_timeout")
        XCTAssertEqual(config.listeners[1].clusters.map(\.name), ["local"], "a cluster not sent leaves the split")
        XCTAssertEqual(config.clusters.map(\.name), ["local", "web"])

        let alone = file.composed(withDiscovered: []).config
        XCTAssertEqual(alone.clusters.first { $0.name == "web" }?.endpoints, [], "a listener's only cluster stands empty until sent")

        let clash = file.composed(withDiscovered: [Config.Cluster(name: "local", endpoints: [])])
        XCTAssertEqual(clash.errors.count, 1)
        XCTAssertTrue(clash.errors[0].contains("cluster \"local\" is defined in the config file"), clash.errors[0])

        // Without xds:, a dangling name is still an error.
        let dangling = ConfigParser.parse(yaml: """
            listeners: [{ name: a, address: "127.0.0.1:8080", cluster: web }]
            clusters: [{ name: local, endpoints: [{ address: "127.0.0.1:9001" }] }]
            """)
        guard case .failure(let e) = dangling else { return XCTFail("a listener naming no cluster parsed") }
        XCTAssertTrue(e.description.contains("unknown cluster \"web\""), e.description)
        guard case .failure(let bad) = ConfigParser.parse(yaml: """
            xds: { server: "nohost", node_id: "" }
            listeners: [{ name: a, address: "127.0.0.1:8080", cluster: web }]
            """) else { return XCTFail("a bad xds section parsed") }
        XCTAssertTrue(bad.description.contains("xds.server") && bad.description.contains("xds.node_id"), bad.description)
    }
}
