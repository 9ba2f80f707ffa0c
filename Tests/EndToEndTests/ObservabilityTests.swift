import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// `/metrics` against the real tools: Debian's Prometheus scraping l4lb, and promtool's
/// linter.
final class ObservabilityTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// Issue 12, must-show 1: Prometheus scrapes `/metrics` for at least three intervals
    /// and a PromQL query returns the connection total the test produced; `promtool check
    /// metrics` finds nothing to complain about. Counters agree with `/stats`.
    func testPrometheusScrapesTheConnectionTotalTheTestProduced() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let main = Sockets.freePort()
        let config = LiveOperationsTests.LiveConfig(main: main, extra: nil, pool: [(backend.address, 1)], side: [backend.address])
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }
        let exchanges = 37
        for _ in 0..<exchanges { XCTAssertTrue(HealthTests.exchange(main)) }
        // The harness's readiness probe was one more connection.
        let expected = exchanges + 1
        XCTAssertTrue(waitUntil(timeout: 5) { ((try? proxy.stats()) ?? [:]).listener("main")?.int("active") == 0 })
        XCTAssertEqual(try proxy.stats().listener("main")?.int("total"), expected)

        let metrics = try proxy.admin("GET", "/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.headers["content-type"]?.hasPrefix("text/plain") == true)
        XCTAssertTrue(metrics.text.contains("l4lb_listener_connections_total{listener=\"main\"} \(expected)"), metrics.text)
        XCTAssertTrue(metrics.text.contains("l4lb_listener_received_bytes_total{listener=\"main\"} \(exchanges * 5)"), metrics.text)
        XCTAssertTrue(metrics.text.contains("l4lb_endpoint_healthy{cluster=\"pool\",endpoint=\"\(backend.address)\"} 1"), metrics.text)

        // promtool's linter, on exactly what l4lb serves.
        let body = proxy.directory.appendingPathComponent("metrics.txt")
        try Data(metrics.body).write(to: body)
        let lint = try ChildProcess.run("/bin/sh", ["-c", "promtool check metrics < \(body.path)"])
        XCTAssertEqual(lint.status, 0, lint.output)
        XCTAssertEqual(lint.output.trimmingCharacters(in: .whitespacesAndNewlines), "", "promtool: \(lint.output)")

        // A real Prometheus, scraping every second.
        let web = Sockets.freePort()
        let prometheusConfig = proxy.directory.appendingPathComponent("prometheus.yml")
        try """
        global: { scrape_interval: 1s, evaluation_interval: 1s }
        scrape_configs:
          - job_name: l4lb
            static_configs: [{ targets: ["127.0.0.1:\(proxy.adminPort)"] }]
        """.write(to: prometheusConfig, atomically: true, encoding: .utf8)
        let prometheus = try ChildProcess("/usr/bin/prometheus", [
            "--config.file=\(prometheusConfig.path)",
            "--storage.tsdb.path=\(proxy.directory.appendingPathComponent("tsdb").path)",
            "--web.listen-address=127.0.0.1:\(web)",
        ], stderr: proxy.directory.appendingPathComponent("prometheus.log").path)
        defer {
            prometheus.terminate()
            _ = prometheus.wait(timeout: 10)
        }
        func query(_ promql: String) -> Double? {
            let encoded = promql.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? promql
            guard let response = try? AdminHTTP.request(port: web, "GET", "/api/v1/query?query=\(encoded)"), response.status == 200,
                  let data = response.json["data"] as? [String: Any],
                  let result = (data["result"] as? [[String: Any]])?.first,
                  let value = result["value"] as? [Any], value.count == 2, let text = value[1] as? String
            else { return nil }
            return Double(text)
        }
        XCTAssertTrue(waitUntil(timeout: 30) { (query("count_over_time(up{job=\"l4lb\"}[5m])") ?? 0) >= 3 },
                      "Prometheus did not scrape three times: \((try? String(contentsOf: proxy.directory.appendingPathComponent("prometheus.log"), encoding: .utf8)) ?? "")")
        XCTAssertEqual(query("up{job=\"l4lb\"}"), 1)
        XCTAssertEqual(query("l4lb_listener_connections_total{listener=\"main\"}"), Double(expected))
        let upstream = try proxy.stats().endpoint(cluster: "pool", address: backend.address)?.int("total") ?? -1
        XCTAssertGreaterThanOrEqual(upstream, exchanges)
        XCTAssertEqual(query("l4lb_endpoint_connections_total{cluster=\"pool\",endpoint=\"\(backend.address)\"}"), Double(upstream))
        XCTAssertEqual(query("l4lb_snapshot_generation"), 1)

        // Counters carry on across a reload (kept by identity), and the reload is counted.
        var changed = config
        changed.balancer = "least_request"
        try proxy.writeConfig(changed.yaml)
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        for _ in 0..<3 { XCTAssertTrue(HealthTests.exchange(main)) }
        let after = try proxy.admin("GET", "/metrics").text
        XCTAssertTrue(after.contains("l4lb_listener_connections_total{listener=\"main\"} \(expected + 3)"), after)
        XCTAssertTrue(after.contains("l4lb_reloads_total{result=\"success\"} 1"), after)
        XCTAssertTrue(after.contains("l4lb_snapshot_generation 2"), after)
    }
}
