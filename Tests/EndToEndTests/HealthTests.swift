import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Health checks, outlier detection and circuit breaking end to end: real l4lb, real
/// backends (in-test servers, Debian's redis-server and nginx).
final class HealthTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    func config(port: UInt16, endpoints: [String], cluster: [String], listener: [String] = [], workers: Int = 2) -> String {
        var lines = ["workers: \(workers)", "drain_timeout: 2s", "listeners:", "  - name: test", "    address: 127.0.0.1:\(port)", "    cluster: backends"]
        lines += listener.map { "    " + $0 }
        lines += ["clusters:", "  - name: backends"]
        lines += cluster.map { "    " + $0 }
        lines.append("    endpoints:")
        lines += endpoints.map { "      - { address: \($0) }" }
        return lines.joined(separator: "\n") + "\n"
    }

    /// One short echo exchange through the proxy; true when it worked.
    func exchange(_ port: UInt16) -> Bool { Self.exchange(port) }

    static func exchange(_ port: UInt16) -> Bool {
        guard let fd = try? Sockets.connect(port: port, timeout: 3) else { return false }
        defer { close(fd) }
        let message = Array("hello".utf8)
        guard (try? Sockets.sendAll(fd, message)) != nil else { return false }
        return (try? Sockets.receiveExactly(fd, message.count)) == message
    }

    /// Clients opening connections one after another until stopped.
    final class SteadyClients: @unchecked Sendable {
        let port: UInt16
        private let lock = NSLock()
        private var running = true
        private var threads = 0
        private(set) var succeeded = 0
        private(set) var failed = 0
        /// Failed connections that started after `since` (set by the test).
        private(set) var failedAfter = 0
        var since = Date.distantFuture

        init(port: UInt16, count: Int, exchange: @escaping @Sendable (UInt16) -> Bool) {
            self.port = port
            for _ in 0..<count {
                lock.withLock { threads += 1 }
                Thread { [self] in
                    while lock.withLock({ running }) {
                        let started = Date()
                        let ok = exchange(port)
                        lock.withLock {
                            if ok { succeeded += 1 } else { failed += 1 }
                            if !ok, started > since { failedAfter += 1 }
                        }
                    }
                    lock.withLock { threads -= 1 }
                }.start()
            }
        }

        func mark() { lock.withLock { since = Date() } }

        func stop() -> (succeeded: Int, failed: Int, failedAfterMark: Int) {
            lock.withLock { running = false }
            _ = waitUntil(timeout: 10) { self.lock.withLock { self.threads == 0 } }
            return lock.withLock { (succeeded, failed, failedAfter) }
        }
    }

    /// Must show 1 and 2: a killed endpoint stops getting connections within
    /// unhealthy_threshold × interval + timeout with no client failing; when it comes back
    /// it gets traffic only after healthy_threshold passing checks.
    func testKilledEndpointIsTakenOutAndComesBackAfterPassingChecks() throws {
        let a = try TestBackend(.echo)
        let b = try TestBackend(.echo)
        var c = try TestBackend(.echo)
        let cPort = c.port
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: [a.address, b.address, c.address],
            cluster: ["health_check: { type: tcp, interval: 200ms, timeout: 200ms, healthy_threshold: 3, unhealthy_threshold: 2 }"],
            listener: ["connect_attempts: 3"]), waitFor: ("127.0.0.1", port))
        let clients = SteadyClients(port: port, count: 4) { HealthTests.exchange($0) }
        XCTAssertTrue(waitUntil(timeout: 5) { c.dataConnections > 10 }, "c never got traffic")

        c.stop()  // killed: its port refuses connections; what was in flight on it fails
        clients.mark()
        let detected = waitForLogLine(proxy, containing: ["endpoint health changed", "endpoint=127.0.0.1:\(cPort) ", "to=unhealthy"], timeout: 5)
        XCTAssertNotNil(detected, "no unhealthy transition logged:\n\(proxy.log)")
        if let detected {
            // Timing is the benchmark's business; the test checks it took the failures the
            // config asks for (unhealthy_threshold 2), not fewer.
            print("killed endpoint marked unhealthy after \(Int(detected * 1000)) ms (budget 2 × 200 + 200 = 600 ms)")
            XCTAssertTrue(proxy.log.contains("2 checks failed"), "not taken out after unhealthy_threshold failures:\n\(proxy.log)")
        }

        // Back on the same port: health checks (no data) start passing at once, but until the
        // third pass no client connection may arrive.
        c = try TestBackend(.echo, port: cPort)
        let restarted = Date()
        // Until the checker logs it healthy, no client connection may arrive. (Polled, not
        // judged at a fixed time: a stalled test thread would misread a legitimate one.)
        var early = 0
        var back = false
        let deadline = Date().addingTimeInterval(5)
        while !back, Date() < deadline {
            let seen = c.dataConnections
            back = proxy.log.contains("endpoint=127.0.0.1:\(cPort) ") && proxy.log.split(separator: "\n").contains {
                $0.contains("endpoint=127.0.0.1:\(cPort) ") && $0.contains("3 checks passed") && $0.contains("to=healthy")
            }
            if !back { early = seen }
            usleep(5_000)
        }
        XCTAssertEqual(early, 0, "traffic reached the endpoint before healthy_threshold checks passed")
        XCTAssertTrue(back, "not healthy again after three passing checks:\n\(proxy.log)")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(restarted), 0.35, "healthy before three checks could pass")
        XCTAssertTrue(waitUntil(timeout: 3) { c.dataConnections > 5 }, "traffic did not resume")

        let (succeeded, failed, failedAfterKill) = clients.stop()
        print("steady clients: \(succeeded) succeeded, \(failed) failed (in flight on the killed backend), \(failedAfterKill) started after the kill failed")
        XCTAssertEqual(failedAfterKill, 0, "new client connections failed while an endpoint was dying")
        XCTAssertLessThanOrEqual(failed, 4, "more failures than connections in flight (4 clients)")
        XCTAssertGreaterThan(succeeded, 100)
        let (_, log) = proxy.stopAndCollectLog()
        // Healthy at start, unhealthy when killed, healthy again.
        XCTAssertEqual(endpointCounter(log, endpoint: "127.0.0.1:\(cPort)", "health_transitions"), 3, log)
    }

    /// Must show 2 with slow_start: a returning endpoint's share ramps up.
    func testSlowStartRampsAReturningEndpoint() throws {
        let a = try TestBackend(.echo)
        let bPort = Sockets.freePort()
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: [a.address, "127.0.0.1:\(bPort)"],
            cluster: ["slow_start: 3s", "health_check: { type: tcp, interval: 100ms, timeout: 100ms, healthy_threshold: 1, unhealthy_threshold: 1 }"]),
            waitFor: ("127.0.0.1", port))
        // l4lb listens before its first health round ends; start B only once its first
        // check has failed, so B *returns* (and ramps) rather than starts healthy.
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["failed its first health check", "endpoint=127.0.0.1:\(bPort) "], timeout: 5))
        let b = try TestBackend(.echo, port: bPort)
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["endpoint=127.0.0.1:\(bPort) ", "to=healthy"], timeout: 5))
        let clients = SteadyClients(port: port, count: 4) { HealthTests.exchange($0) }
        var shares: [Double] = []
        for _ in 0..<3 {
            let (a0, b0) = (a.dataConnections, b.dataConnections)
            usleep(1_000_000)
            let (da, db) = (a.dataConnections - a0, b.dataConnections - b0)
            shares.append(Double(db) / Double(max(1, da + db)))
        }
        _ = clients.stop()
        print("slow start: returning endpoint's share per second: \(shares.map { String(format: "%.2f", $0) })")
        XCTAssertLessThan(shares[0], 0.35, "no ramp: \(shares)")
        XCTAssertGreaterThan(shares[2], shares[0] + 0.1, "share did not grow: \(shares)")
        proxy.stop()
    }

    /// Must show 3: send_expect against a real Redis (PING → +PONG): healthy; unhealthy
    /// when it answers something else (-NOAUTH) and when it hangs past the timeout.
    func testSendExpectAgainstRedis() throws {
        let redisPort = Sockets.freePort()
        let redis = try ChildProcess("/usr/bin/redis-server", ["--port", "\(redisPort)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        defer {
            redis.signal(SIGCONT)
            redis.terminate()
            redis.wait()
        }
        XCTAssertTrue(waitUntil(timeout: 5) { (try? Sockets.connect(port: redisPort, timeout: 0.5)).map { close($0); return true } ?? false })
        func redisCommand(_ command: String) throws -> String {
            let fd = try Sockets.connect(port: redisPort)
            defer { close(fd) }
            try Sockets.sendAll(fd, Array(command.utf8))
            var reply: [UInt8] = []
            while reply.last != 0x0A { reply += try Sockets.receiveExactly(fd, 1) }
            return String(decoding: reply, as: UTF8.self)
        }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: ["127.0.0.1:\(redisPort)"],
            cluster: ["health_check: { type: send_expect, send: \"PING\\r\\n\", expect: \"+PONG\", interval: 100ms, timeout: 300ms, healthy_threshold: 1, unhealthy_threshold: 2 }"]),
            waitFor: ("127.0.0.1", port))
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=healthy", "expected reply"], timeout: 5), proxy.log)

        XCTAssertEqual(try redisCommand("CONFIG SET requirepass secret\r\n"), "+OK\r\n")
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=unhealthy", "unexpected reply", "NOAUTH"], timeout: 5), proxy.log)
        XCTAssertEqual(try redisCommand("AUTH secret\r\nCONFIG SET requirepass \"\"\r\n").hasPrefix("+OK"), true)
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=healthy", "1 checks passed"], timeout: 5), proxy.log)

        redis.signal(SIGSTOP)  // hangs: accepts (the kernel does), never answers
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=unhealthy", "timed out after 300ms"], timeout: 5), proxy.log)
        proxy.stop()
    }

    /// Must show 3: http checks against nginx: healthy on 200, unhealthy on 503.
    func testHTTPCheckAgainstNginx() throws {
        let nginxPort = Sockets.freePort()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nginx-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        func writeConfig(status: Int) throws {
            try """
                worker_processes 1; daemon off; pid \(directory.path)/nginx.pid; error_log stderr error;
                events { worker_connections 256; }
                http { access_log off; server { listen 127.0.0.1:\(nginxPort); location /healthz { return \(status); } } }
                """.write(to: directory.appendingPathComponent("nginx.conf"), atomically: true, encoding: .utf8)
        }
        try writeConfig(status: 200)
        let nginx = try ChildProcess("/usr/sbin/nginx", ["-e", "stderr", "-p", directory.path, "-c", directory.appendingPathComponent("nginx.conf").path])
        defer {
            nginx.terminate()
            nginx.wait()
        }
        XCTAssertTrue(waitUntil(timeout: 5) { (try? Sockets.connect(port: nginxPort, timeout: 0.5)).map { close($0); return true } ?? false })
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: ["127.0.0.1:\(nginxPort)"],
            cluster: ["health_check: { type: http, path: /healthz, host: health.example, interval: 100ms, timeout: 300ms, healthy_threshold: 1, unhealthy_threshold: 2 }"]),
            waitFor: ("127.0.0.1", port))
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=healthy", "HTTP 200"], timeout: 5), proxy.log)
        try writeConfig(status: 503)
        nginx.signal(SIGHUP)  // nginx reloads its config
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["to=unhealthy", "HTTP 503"], timeout: 5), proxy.log)
        proxy.stop()
    }

    /// Must show 4: with active checks off, outlier detection ejects an endpoint that
    /// refuses connections after consecutive_failures, keeps it out for ejection_time,
    /// returns it, and ejects a repeat offender for twice as long.
    func testOutlierDetectionEjectsAndReturns() throws {
        let alive = try TestBackend(.echo)
        let deadPort = Sockets.freePort()
        let dead = "endpoint=127.0.0.1:\(deadPort) "
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: [alive.address, "127.0.0.1:\(deadPort)"],
            cluster: ["outlier_detection: { consecutive_failures: 3, ejection_time: 1s }"]), waitFor: ("127.0.0.1", port))
        func ejectedLines() -> Int { proxy.log.split(separator: "\n").filter { $0.contains("endpoint ejected") && $0.contains(dead) }.count }
        /// Client exchanges until the dead endpoint has been ejected `count` times.
        func exchangesUntilEjected(_ count: Int) -> Int {
            var n = 0
            while ejectedLines() < count, n < 500 {
                XCTAssertTrue(exchange(port), "retries should hide the dead endpoint from clients")
                n += 1
                usleep(2000)
            }
            return n
        }
        let before = exchangesUntilEjected(1)
        XCTAssertEqual(ejectedLines(), 1, proxy.log)
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["endpoint ejected", dead, "ejection_time=1s"], timeout: 1))
        let ejectedAt = Date()
        // While ejected, no connect goes to it: these 30 add no connect failure.
        for _ in 0..<30 { XCTAssertTrue(exchange(port)) }
        let returned = waitForLogLine(proxy, containing: ["returned from ejection", dead], timeout: 3)
        XCTAssertNotNil(returned, proxy.log)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(ejectedAt), 0.85, "returned before ejection_time")
        let after = exchangesUntilEjected(2)
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["endpoint ejected", dead, "ejection_time=2s"], timeout: 1), proxy.log)
        let (_, log) = proxy.stopAndCollectLog()
        let failures = endpointCounter(log, endpoint: "127.0.0.1:\(deadPort)", "connect_failures") ?? -1
        print("outlier detection: \(failures) connects to the dead endpoint over \(before) + 30 + \(after) client connections")
        // Each client connection tries an endpoint at most once; the 30 during ejection none.
        XCTAssertLessThanOrEqual(failures, before + after, "connects went to an ejected endpoint")
        XCTAssertGreaterThanOrEqual(failures, 6)
        XCTAssertEqual(endpointCounter(log, endpoint: "127.0.0.1:\(deadPort)", "outlier_ejections"), 2, log)
    }

    /// Must show 5: max_connections 100 on a cluster: the 101st concurrent client is
    /// refused and counted; the first 100 are unaffected.
    func testClusterMaxConnectionsRefusesTheHundredAndFirst() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: [backend.address], cluster: ["max_connections: 100"]), waitFor: ("127.0.0.1", port))
        XCTAssertTrue(waitUntil(timeout: 5) { backend.closed == 1 })  // the readiness probe is gone
        var open: [Int32] = []
        for i in 0..<100 {
            let fd = try Sockets.connect(port: port)
            try Sockets.sendAll(fd, Array("first \(i)".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, "first \(i)".utf8.count), Array("first \(i)".utf8))
            open.append(fd)
        }
        let extra = try Sockets.connect(port: port)
        XCTAssertNotNil(Sockets.waitForClose(extra, timeout: 2), "the 101st client was not refused")
        close(extra)
        for (i, fd) in open.enumerated() {
            let message = Array("again \(i)".utf8)
            try Sockets.sendAll(fd, message)
            XCTAssertEqual(try Sockets.receiveExactly(fd, message.count), message, "connection \(i) was disturbed")
            close(fd)
        }
        XCTAssertTrue(waitUntil(timeout: 5) { self.exchange(port) }, "a place did not free up after the 100 closed")
        let (_, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(summaryCounter(log, listener: "test", "cluster_full"), 1, log)
    }

    /// Must show 6: all endpoints down: clients are closed promptly and counted; when one
    /// returns, traffic resumes without a restart.
    func testAllEndpointsDownThenOneReturns() throws {
        var backend = try TestBackend(.echo)
        let backendPort = backend.port
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: [backend.address],
            cluster: ["health_check: { type: tcp, interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 1 }"],
            listener: ["connect_timeout: 500ms", "connect_attempts: 2"]), waitFor: ("127.0.0.1", port))
        // Precondition: the backend passed l4lb's first check (a flake once saw it refused).
        _ = waitForLogLine(proxy, containing: ["l4lb serving"], timeout: 5)
        if proxy.log.contains("failed its first health check") {
            return XCTFail("the backend on port \(backendPort) was refused before the test began: \(backend.listenerDiagnosis)\n\(proxy.log)")
        }
        backend.stop()
        if waitForLogLine(proxy, containing: ["to=unhealthy"], timeout: 3) == nil {
            failKeepingLog(proxy, "no unhealthy transition within 3 s of stopping the backend on port \(backendPort)")
        }
        for _ in 0..<10 {
            let fd = try Sockets.connect(port: port)
            let elapsed = Sockets.waitForClose(fd, timeout: 2)
            close(fd)
            if elapsed == nil { failKeepingLog(proxy, "client not closed within 2 s") }
        }
        backend = try TestBackend(.echo, port: backendPort)
        XCTAssertTrue(waitUntil(timeout: 5) { self.exchange(port) }, "traffic did not resume")
        let (_, log) = proxy.stopAndCollectLog()
        XCTAssertGreaterThanOrEqual(summaryCounter(log, listener: "test", "connect_failed") ?? 0, 10, log)
    }

    /// Fails with l4lb's raw log and process state, keeping a copy of the log in /tmp
    /// (the test directory is removed when l4lb stops).
    func failKeepingLog(_ proxy: L4LBProcess, _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        let raw = (try? Data(contentsOf: proxy.logURL)) ?? Data()
        let copy = "/tmp/l4lb-flake-\(UUID().uuidString).log"
        _ = FileManager.default.createFile(atPath: copy, contents: raw)
        XCTFail("\(message); l4lb running: \(proxy.process.isRunning), log \(raw.count) bytes copied to \(copy):\n\(String(decoding: raw, as: UTF8.self))", file: file, line: line)
    }

    /// Must show 7: checks of 200 endpoints every 1 s spread over the interval.
    func testChecksOfTwoHundredEndpointsSpreadOverTheInterval() throws {
        let listener = try Sockets.listen(host: "0.0.0.0", port: 0, backlog: 4096)
        defer { close(listener) }
        let checkPort = Sockets.localPort(listener)
        let times = LockedTimes()
        let stop = LockedFlag()
        let acceptor = Thread {
            Sockets.setTimeout(listener, seconds: 0.1)
            while !stop.value {
                let fd = accept(listener, nil, nil)
                if fd >= 0 {
                    times.append(Date())
                    close(fd)
                }
            }
        }
        acceptor.start()
        defer { stop.set() }
        let port = Sockets.freePort()
        let endpoints = (2...201).map { "127.0.0.\($0):\(checkPort)" }
        let proxy = try L4LBProcess(config: config(
            port: port, endpoints: endpoints,
            cluster: ["health_check: { type: tcp, interval: 1s, timeout: 500ms }"], workers: 1), waitFor: ("127.0.0.1", port))
        usleep(3_500_000)
        proxy.stop()
        stop.set()
        let all = times.values
        guard let first = all.first else { return XCTFail("no checks arrived") }
        // The first round is immediate (l4lb learns health before accepting); from then on
        // each endpoint keeps its own phase.
        let steady = all.filter { $0.timeIntervalSince(first) >= 1.2 && $0.timeIntervalSince(first) < 3.2 }
        var buckets = [Int](repeating: 0, count: 20)
        for t in steady { buckets[min(19, Int((t.timeIntervalSince(first) - 1.2) * 10))] += 1 }
        print("health checks per 100 ms over 2 s of steady state (200 endpoints, 1 s interval): \(buckets)")
        XCTAssertGreaterThanOrEqual(steady.count, 360, "about 400 checks expected in 2 s")
        XCTAssertLessThanOrEqual(buckets.max() ?? 0, 50, "checks come in bursts: \(buckets)")
        XCTAssertGreaterThanOrEqual(buckets.min() ?? 0, 5, "checks leave gaps: \(buckets)")
    }
}

final class LockedTimes: @unchecked Sendable {
    private let lock = NSLock()
    private var times: [Date] = []
    func append(_ t: Date) { lock.withLock { times.append(t) } }
    var values: [Date] { lock.withLock { times } }
}

final class LockedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var flag = false
    func set() { lock.withLock { flag = true } }
    var value: Bool { lock.withLock { flag } }
}
