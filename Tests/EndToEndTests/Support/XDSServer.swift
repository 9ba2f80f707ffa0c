import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The tests' xDS management server (`xds_server.py`, on grpcio and the `xds-protos` package):
/// state set over its HTTP control port, every request and response it saw read back.
final class XDSServer {
    let port: UInt16
    let controlPort: UInt16
    private var process: ChildProcess?
    private let log: String
    private let tlsArguments: [String]

    /// `tls`: the server's certificate and key, and a CA that client certificates must chain to.
    init(port: UInt16? = nil, tls: (cert: String, key: String, clientCA: String?)? = nil) throws {
        self.port = port ?? Sockets.freePort()
        controlPort = Sockets.freePort()
        log = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-xds-\(UUID().uuidString).log").path
        var arguments: [String] = []
        if let tls {
            arguments += ["--cert", tls.cert, "--key", tls.key]
            if let ca = tls.clientCA { arguments += ["--client-ca", ca] }
        }
        tlsArguments = arguments
        try start()
    }

    var address: String { "127.0.0.1:\(port)" }

    /// Starts (again, after `kill`) on the same ports, serving `state` from the start.
    func start(state: (version: String, clusters: [[String: Any]], assignments: [[String: Any]])? = nil) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("xds_server.py").path
        var arguments = ["python3", script, "--port", "\(port)", "--control-port", "\(controlPort)"] + tlsArguments
        if let state {
            let file = log + ".state.json"
            try JSONSerialization.data(withJSONObject: ["version": state.version, "clusters": state.clusters, "assignments": state.assignments])
                .write(to: URL(fileURLWithPath: file))
            arguments += ["--state", file]
        }
        process = try ChildProcess("/usr/bin/env", arguments, stdout: log, stderr: log)
        guard waitUntil(timeout: 20, { (try? AdminHTTP.request(port: self.controlPort, "GET", "/ready").status) == 200 }) else {
            throw Sockets.Failure("the xDS server did not start: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")", 0)
        }
    }

    /// SIGKILL: the stream ends without a goodbye.
    func kill() {
        process?.signal(SIGKILL)
        _ = process?.wait(timeout: 5)
        process = nil
    }

    func stop() { kill() }

    /// Sets the clusters and assignments (Envoy's proto3 JSON) as version `version` and pushes
    /// them to every stream.
    func set(version: String, clusters: [[String: Any]], assignments: [[String: Any]]) throws {
        let body = try JSONSerialization.data(withJSONObject: ["version": version, "clusters": clusters, "assignments": assignments])
        let response = try AdminHTTP.request(port: controlPort, "POST", "/state", body: String(decoding: body, as: UTF8.self))
        guard response.status == 200 else { throw Sockets.Failure("xds server refused the state: \(response.text)", 0) }
    }

    func churn(rate: Int, seconds: Int) throws {
        _ = try AdminHTTP.request(port: controlPort, "POST", "/churn", body: "{\"rate\": \(rate), \"seconds\": \(seconds)}")
    }

    /// Every request received and response sent, in order.
    func entries() -> [[String: Any]] {
        guard let response = try? AdminHTTP.request(port: controlPort, "GET", "/log") else { return [] }
        return (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [[String: Any]] ?? []
    }

    func requests(_ type: String? = nil) -> [[String: Any]] {
        entries().filter { $0["kind"] as? String == "request" && (type == nil || $0["type_url"] as? String == type) }
    }

    func responses(_ type: String? = nil) -> [[String: Any]] {
        entries().filter { $0["kind"] as? String == "response" && (type == nil || $0["type_url"] as? String == type) }
    }

    /// Whether l4lb has ACKed `version` of `type` (a request echoing it, with no error).
    func acked(_ type: String, version: String) -> Bool {
        requests(type).contains { $0["version_info"] as? String == version && $0["error_detail"] is NSNull && ($0["response_nonce"] as? String ?? "") != "" }
    }

    static let cds = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    static let eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

    // MARK: Resources, as Envoy's JSON

    static func cluster(_ name: String, policy: String = "ROUND_ROBIN", extra: [String: Any] = [:]) -> [String: Any] {
        var cluster: [String: Any] = [
            "name": name, "type": "EDS", "lbPolicy": policy,
            "edsClusterConfig": ["serviceName": name, "edsConfig": ["ads": [:]]],
            "connectTimeout": "1s",
        ]
        for (k, v) in extra { cluster[k] = v }
        return cluster
    }

    /// `endpoints`: (ip, port, weight, health status) at priority 0.
    static func assignment(_ name: String, _ endpoints: [(String, UInt16, Int, String)]) -> [String: Any] {
        [
            "clusterName": name,
            "endpoints": [[
                "lbEndpoints": endpoints.map { ip, port, weight, health -> [String: Any] in
                    [
                        "endpoint": ["address": ["socketAddress": ["address": ip, "portValue": Int(port)]]],
                        "loadBalancingWeight": weight, "healthStatus": health,
                    ]
                },
            ]],
        ]
    }
}
