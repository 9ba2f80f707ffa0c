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

    /// Access-log lines as JSON objects.
    static func accessLines(_ path: String) -> [[String: Any]] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
    }

    /// Issue 12, must-show 2 (access-log part): one line per connection, with the exact
    /// bytes each way and the right end for client FIN, upstream FIN, reset, idle timeout
    /// and refused; totals agree with `/stats`; SIGUSR1 reopens the file.
    func testAccessLogRecordsEveryConnectionWithItsBytesAndEnd() throws {
        let echo = try TestBackend(.echo)
        let download = try TestBackend(.stream(bytes: 1000, seed: 7))
        defer { echo.stop(); download.stop() }
        let main = Sockets.freePort()
        let dl = Sockets.freePort()
        let one = Sockets.freePort()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-access-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let logPath = directory.appendingPathComponent("access.log").path
        let proxy = try L4LBProcess(config: """
            workers: 2
            access_log: { path: \(logPath), format: json }
            listeners:
              - { name: main, address: 127.0.0.1:\(main), cluster: echo, idle_timeout: 1s }
              - { name: dl, address: 127.0.0.1:\(dl), cluster: download }
              - { name: one, address: 127.0.0.1:\(one), cluster: echo, max_connections: 1 }
            clusters:
              - { name: echo, endpoints: [{ address: \(echo.address) }] }
              - { name: download, endpoints: [{ address: \(download.address) }] }
            """, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }

        // Client FIN first: 100 bytes up, half-close, 100 back, then the echo closes.
        let a = try Sockets.connect(port: main)
        Sockets.setTimeout(a, seconds: 5)
        let portA = Sockets.localPort(a)
        try Sockets.sendAll(a, [UInt8](repeating: 1, count: 100))
        shutdown(a, Int32(SHUT_WR))
        XCTAssertEqual(try Sockets.receiveAll(a).count, 100)
        close(a)
        // Upstream FIN first: a 1,000-byte download.
        let b = try Sockets.connect(port: dl)
        Sockets.setTimeout(b, seconds: 5)
        let portB = Sockets.localPort(b)
        XCTAssertEqual(try Sockets.receiveAll(b).count, 1000)
        close(b)
        // Reset by the client.
        let c = try Sockets.connect(port: main)
        Sockets.setTimeout(c, seconds: 5)
        let portC = Sockets.localPort(c)
        try Sockets.sendAll(c, [UInt8](repeating: 2, count: 10))
        XCTAssertEqual(try Sockets.receiveExactly(c, 10).count, 10)
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(c, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        close(c)
        // Idle timeout (1 s).
        let d = try Sockets.connect(port: main)
        Sockets.setTimeout(d, seconds: 5)
        let portD = Sockets.localPort(d)
        try Sockets.sendAll(d, [UInt8](repeating: 3, count: 5))
        XCTAssertEqual(try Sockets.receiveExactly(d, 5).count, 5)
        XCTAssertNotNil(Sockets.waitForClose(d, timeout: 5))
        close(d)
        // Refused: `one` holds at most one connection.
        let held = try Sockets.connect(port: one)
        Sockets.setTimeout(held, seconds: 5)
        try Sockets.sendAll(held, [9])
        XCTAssertEqual(try Sockets.receiveExactly(held, 1), [9])
        let e = try Sockets.connect(port: one)
        let portE = Sockets.localPort(e)
        XCTAssertNotNil(Sockets.waitForClose(e, timeout: 5))
        close(e)
        close(held)

        func line(_ port: UInt16) -> [String: Any]? {
            ObservabilityTests.accessLines(logPath).first { ($0["client"] as? String) == "127.0.0.1:\(port)" }
        }
        XCTAssertTrue(waitUntil(timeout: 5) { [portA, portB, portC, portD, portE].allSatisfy { line($0) != nil } }, (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "")
        let expected: [(UInt16, String, String, Int, Int)] = [
            (portA, "main", "client_fin", 100, 100), (portB, "dl", "upstream_fin", 0, 1000), (portC, "main", "reset", 10, 10),
            (portD, "main", "idle_timeout", 5, 5), (portE, "one", "refused", 0, 0),
        ]
        for (port, listener, end, bytesIn, bytesOut) in expected {
            let entry = line(port) ?? [:]
            XCTAssertEqual(entry["listener"] as? String, listener, "\(entry)")
            XCTAssertEqual(entry["end"] as? String, end, "\(entry)")
            XCTAssertEqual(entry.int("bytes_in"), bytesIn, "\(entry)")
            XCTAssertEqual(entry.int("bytes_out"), bytesOut, "\(entry)")
        }
        XCTAssertEqual(line(portE)?["endpoint"] as? NSNull, NSNull())
        XCTAssertEqual(line(portA)?["endpoint"] as? String, echo.address)

        // Every connection of `main` is one line, and the bytes add up to /stats'.
        XCTAssertTrue(waitUntil(timeout: 5) { ((try? proxy.stats()) ?? [:]).listener("main")?.int("active") == 0 })
        let stats = try proxy.stats()
        let mainLines = ObservabilityTests.accessLines(logPath).filter { $0["listener"] as? String == "main" }
        XCTAssertEqual(mainLines.count, stats.listener("main")?.int("total"))
        XCTAssertEqual(mainLines.reduce(0) { $0 + $1.int("bytes_in") }, stats.listener("main")?.int("bytes_in"))
        XCTAssertEqual(mainLines.reduce(0) { $0 + $1.int("bytes_out") }, stats.listener("main")?.int("bytes_out"))
        XCTAssertEqual(ObservabilityTests.accessLines(logPath).filter { $0["end"] as? String == "refused" }.count, stats.listener("one")?.int("refused"))

        // logrotate: move the file away, SIGUSR1, and new lines go to a new file.
        let rotated = logPath + ".1"
        XCTAssertEqual(rename(logPath, rotated), 0)
        proxy.process.signal(SIGUSR1)
        XCTAssertTrue(waitUntil(timeout: 5) {
            _ = HealthTests.exchange(main)
            return !ObservabilityTests.accessLines(logPath).isEmpty
        }, "no new file after SIGUSR1")
        XCTAssertTrue(proxy.process.isRunning)
    }

    /// Issue 12, must-show 3: with `access_log: off` nothing is written; with a writer
    /// that blocks (a FIFO nobody reads) every connection is still served and the lines
    /// that did not fit are dropped and counted.
    func testAccessLogOffWritesNothingAndABlockedWriterOnlyDropsLines() throws {
        let echo = try TestBackend(.echo)
        defer { echo.stop() }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-access-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }

        // Off: 50 connections, not a byte on stdout. (With `path: stdout` they would be there.)
        for (setting, expectLines) in [("off", false), ("{ path: stdout, format: text }", true)] {
            let main = Sockets.freePort()
            let stdout = directory.appendingPathComponent("stdout-\(expectLines)").path
            let proxy = try L4LBProcess(config: """
                workers: 2
                access_log: \(setting)
                listeners: [{ name: main, address: 127.0.0.1:\(main), cluster: echo }]
                clusters: [{ name: echo, endpoints: [{ address: \(echo.address) }] }]
                """, waitFor: ("127.0.0.1", main), stdout: stdout)
            for _ in 0..<50 { XCTAssertTrue(HealthTests.exchange(main)) }
            let (status, _) = proxy.stopAndCollectLog()
            XCTAssertEqual(status, 0)
            let written = (try? String(contentsOfFile: stdout, encoding: .utf8)) ?? ""
            if expectLines {
                // 50 exchanges and the harness's readiness probe.
                XCTAssertEqual(written.split(separator: "\n").filter { $0.contains(" main 127.0.0.1:") && $0.hasSuffix("client_fin") }.count, 51, written)
            } else {
                XCTAssertEqual(written, "", "access_log: off wrote something")
            }
        }

        // A FIFO that is open but never read: the writer blocks once the pipe is full.
        let fifo = directory.appendingPathComponent("blocked.fifo").path
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        let reader = open(fifo, O_RDONLY | O_NONBLOCK)
        XCTAssertGreaterThanOrEqual(reader, 0)
        defer { close(reader) }
        let main = Sockets.freePort()
        let proxy = try L4LBProcess(config: """
            workers: 2
            access_log: { path: \(fifo), format: json }
            listeners: [{ name: main, address: 127.0.0.1:\(main), cluster: echo }]
            clusters: [{ name: echo, endpoints: [{ address: \(echo.address) }] }]
            """, waitFor: ("127.0.0.1", main), environment: ["L4LB_ACCESS_LOG_RING": "256"])
        defer { proxy.stop() }
        let result = LoadClient.echo(port: main, connections: 3000, concurrency: 20, bytes: 200, timeout: 60)
        XCTAssertEqual(result.completed, 3000, "connections failed while the access log was blocked: \(result.failed.prefix(5))")
        XCTAssertEqual(result.mismatched, 0)
        // 3,000 lines (and the probe's) against a 64 KiB pipe nobody reads: most are
        // dropped (in the workers' rings or at the write), and every one is counted.
        var accessLog: [String: Any] = [:]
        _ = waitUntil(timeout: 5) {
            accessLog = ((try? proxy.stats()) ?? [:])["access_log"] as? [String: Any] ?? [:]
            return accessLog.int("dropped") + accessLog.int("written") == 3001
        }
        XCTAssertGreaterThan(accessLog.int("dropped"), 1500, "dropped lines not counted: \(accessLog)")
        XCTAssertEqual(accessLog.int("dropped") + accessLog.int("written"), 3001, "\(accessLog)")
        let metrics = try proxy.admin("GET", "/metrics").text
        XCTAssertTrue(metrics.contains("l4lb_access_log_lines_total{result=\"dropped\"}"), metrics)
        // And it still stops promptly on SIGTERM, the output blocked or not.
        let stopped = Date()
        let (status, _) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertLessThan(Date().timeIntervalSince(stopped), 5)
    }

    /// `--log-format json`: every log line is a JSON object with the message and its
    /// metadata as fields.
    func testJSONLogFormat() throws {
        let echo = try TestBackend(.echo)
        defer { echo.stop() }
        let main = Sockets.freePort()
        let proxy = try L4LBProcess(config: proxyConfig(listen: "127.0.0.1:\(main)", endpoints: [echo.address]),
                                    waitFor: ("127.0.0.1", main), arguments: ["--log-format", "json"])
        XCTAssertTrue(HealthTests.exchange(main))
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        let lines = log.split(separator: "\n")
        XCTAssertGreaterThan(lines.count, 3)
        let objects = lines.compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
        XCTAssertEqual(objects.count, lines.count, "lines that are not JSON:\n\(log)")
        let serving = objects.first { $0["message"] as? String == "l4lb serving" }
        XCTAssertEqual(serving?["level"] as? String, "info")
        XCTAssertEqual(serving?["workers"] as? String, "2")
        XCTAssertTrue((serving?["listeners"] as? String)?.contains("127.0.0.1:\(main)") == true, "\(serving ?? [:])")
        XCTAssertNotNil(objects.first { $0["message"] as? String == "listener totals" && $0["accepted"] as? String == "2" }, log)
    }
}
