import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Live operations end to end: hot reload under load, health and counters kept by
/// identity, invalid reloads, drain, and the admin API's token — against a real l4lb
/// process, real echo backends and real sockets.
final class LiveOperationsTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// A config with listener `main` in front of cluster `pool`, and optionally listener
    /// `extra` in front of cluster `side`.
    struct LiveConfig {
        var main: UInt16
        var extra: UInt16?
        var extraAddress = "127.0.0.1"
        var pool: [(address: String, weight: Int)]
        var balancer = "round_robin"
        var side: [String]
        var healthCheck: String? = "{ type: tcp, interval: 1s, timeout: 500ms }"
        var token: String?
        var adminPort: UInt16?

        var yaml: String {
            var lines: [String] = []
            if let adminPort { lines.append("admin: { address: 127.0.0.1:\(adminPort)\(token.map { ", token: \($0)" } ?? "") }") }
            lines += ["workers: 2", "drain_timeout: 5s", "listeners:",
                      "  - { name: main, address: 127.0.0.1:\(main), cluster: pool }"]
            if let extra { lines.append("  - { name: extra, address: \(extraAddress):\(extra), cluster: side }") }
            lines += ["clusters:", "  - name: pool", "    balancer: \(balancer)"]
            if let healthCheck { lines.append("    health_check: \(healthCheck)") }
            lines.append("    endpoints:")
            lines += pool.map { "      - { address: \($0.address), weight: \($0.weight) }" }
            lines += ["  - name: side", "    endpoints:"]
            lines += side.map { "      - { address: \($0) }" }
            return lines.joined(separator: "\n") + "\n"
        }
    }

    /// `count` connections to `port`, each of which has echoed one message (so it is
    /// connected through to an endpoint), left open.
    func openEchoedConnections(_ count: Int, port: UInt16) throws -> [Int32] {
        try (0..<count).map { _ in
            let fd = try Sockets.connect(port: port)
            Sockets.setTimeout(fd, seconds: 5)
            try Sockets.sendAll(fd, Array("hi".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, 2), Array("hi".utf8))
            return fd
        }
    }

    /// Must-shows 1 and 6: 200 connections stream both ways and new ones keep arriving
    /// while the config is reloaded 100 times (endpoints added and removed, weights and
    /// balancer changed, a listener added and removed). Nothing established is disturbed,
    /// every new connection succeeds, the removed listener refuses, the added one accepts,
    /// `/stats` bytes match what the clients sent, and descriptors, threads and memory do
    /// not grow.
    func testHundredReloadsUnderLoadDisturbNothing() throws {
        let backends = try (0..<4).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let main = Sockets.freePort()
        let extra = Sockets.freePort()
        var config = LiveConfig(main: main, extra: nil, pool: [(backends[0].address, 1), (backends[1].address, 1)], side: [backends[3].address])
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }

        let streams = try StreamingConnections(port: main, count: 200)
        let churn = ConnectionChurn(port: main)
        XCTAssertTrue(waitUntil(timeout: 10) { streams.received > 1_000_000 && churn.succeeded > 20 }, "traffic did not start")

        let balancers = ["round_robin", "least_request", "maglev", "ring_hash", "random"]
        /// Writes generation `i`'s config and reloads it: SIGHUP every tenth time, else
        /// POST /reload; then checks the listener `extra` is there exactly when it should be.
        func reload(_ i: Int) throws {
            // Rotate through subsets of the four backends (always at least one), weights
            // 1–3, every balancer; `extra` exists in odd generations only.
            let members = (0..<4).filter { (i >> $0) & 1 == 1 || $0 == i % 4 }
            config.pool = members.map { (backends[$0].address, 1 + (i + $0) % 3) }
            config.balancer = balancers[i % balancers.count]
            config.extra = i % 2 == 1 ? extra : nil
            config.side = [backends[(i + 1) % 4].address]
            try proxy.writeConfig(config.yaml)
            if i % 10 == 0 {
                // SIGHUP: wait for the reload's outcome, which is recorded once every
                // worker has taken the snapshot. (The top-level `generation` moves on
                // when it is published, before the workers retire a removed listener.)
                proxy.process.signal(SIGHUP)
                XCTAssertTrue(waitUntil(timeout: 10) {
                    let last = (((try? proxy.stats()) ?? [:])["reloads"] as? [String: Any])?["last"] as? [String: Any]
                    return last?.int("generation") == i + 1 && last?["trigger"] as? String == "SIGHUP"
                }, "SIGHUP reload \(i) not applied")
            } else {
                let response = try proxy.admin("POST", "/reload")
                XCTAssertEqual(response.status, 200, "reload \(i): \(response.text)")
                XCTAssertEqual(response.json.int("generation"), i + 1)
            }
            // The added listener accepts at once; the removed one refuses at once.
            if config.extra != nil {
                XCTAssertTrue(HealthTests.exchange(extra), "reload \(i): the added listener does not serve")
            } else {
                XCTAssertThrowsError(try Sockets.connect(port: extra, timeout: 2), "reload \(i): the removed listener still accepts")
            }
        }
        for i in 1...100 { try reload(i) }

        let churned = churn.finish()
        let streamed = streams.finish()
        XCTAssertEqual(streamed.errors, [], "long-lived connections were disturbed")
        XCTAssertEqual(streamed.received, streamed.sent)
        XCTAssertGreaterThan(streamed.sent, 10_000_000, "too little streamed to mean anything")
        XCTAssertEqual(churned.failures, [], "new connections to the live listener failed")
        XCTAssertGreaterThan(churned.succeeded, 100)
        print("reload under load: \(streamed.sent) bytes each way on 200 connections, \(churned.succeeded) new connections, 100 reloads")

        // Every byte the clients sent to `main` is in its totals, once.
        var stats: [String: Any] = [:]
        XCTAssertTrue(waitUntil(timeout: 10) {
            stats = (try? proxy.stats()) ?? [:]
            return stats.listener("main")?.int("active") == 0
        }, "connections still open: \(stats.listener("main") ?? [:])")
        XCTAssertEqual(stats.listener("main")?.int("bytes_in"), streamed.sent + churned.bytesSent)
        XCTAssertEqual(stats.listener("main")?.int("bytes_out"), streamed.received + churned.bytesSent)
        XCTAssertEqual(stats.int("generation"), 101)
        XCTAssertEqual((stats["reloads"] as? [String: Any])?.int("succeeded"), 100)
        // The plan the long-lived connections held is freed now they are closed.
        for worker in stats["workers"] as? [[String: Any]] ?? [] {
            XCTAssertEqual(worker.int("plans"), 1, "worker \(worker.int("index")) still holds old plans")
            XCTAssertEqual(worker.int("oldest_plan_generation"), 101)
        }

        // Must-show 6: 100 more reloads, with the traffic above already having made its
        // buffers resident, grow nothing. (Each Maglev snapshot alone is ~256 KiB, so
        // leaked snapshots or plans would show.)
        let before = proxy.resources
        for i in 101...200 { try reload(i) }
        XCTAssertTrue(waitUntil(timeout: 5) { (((try? proxy.stats()) ?? [:])["workers"] as? [[String: Any]])?.allSatisfy { $0.int("plans") == 1 } == true })
        // A health check or admin request in flight holds a descriptor for a moment: a
        // leak is one that does not go away.
        _ = waitUntil(timeout: 3) { proxy.resources.descriptors <= before.descriptors }
        let after = proxy.resources
        print("100 more reloads: descriptors \(before.descriptors) → \(after.descriptors), threads \(before.threads) → \(after.threads), RSS \(before.rssKiB) → \(after.rssKiB) KiB")
        XCTAssertLessThanOrEqual(after.descriptors, before.descriptors, "descriptors grew")
        XCTAssertLessThanOrEqual(after.threads, before.threads + 2, "threads grew")
        XCTAssertLessThan(after.rssKiB - before.rssKiB, 2 * 1024, "RSS grew")
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertFalse(log.contains("reload failed"), log)
    }

    /// Must-show 2: an endpoint that was unhealthy before a reload that does not touch it
    /// is still unhealthy after it — no flap, no new check needed — and counters go on.
    func testUnhealthyEndpointStaysUnhealthyAndCountersContinueAcrossReloads() throws {
        let alive = try TestBackend(.echo)
        let dying = try TestBackend(.echo)
        defer { alive.stop() }
        let main = Sockets.freePort()
        var config = LiveConfig(main: main, extra: nil, pool: [(alive.address, 1), (dying.address, 1)], side: [alive.address])
        config.healthCheck = "{ type: tcp, interval: 200ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 2 }"
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }
        dying.stop()
        let dyingAddress = dying.address
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["endpoint health changed", dyingAddress, "to=unhealthy"], timeout: 5))
        for _ in 0..<20 { XCTAssertTrue(HealthTests.exchange(main)) }
        let before = try proxy.stats()
        XCTAssertEqual(before.endpoint(cluster: "pool", address: dyingAddress)?.bool("healthy"), false)
        let transitions = before.endpoint(cluster: "pool", address: dyingAddress)?.int("health_transitions") ?? -1
        let served = before.endpoint(cluster: "pool", address: alive.address)?.int("total") ?? -1
        let servedByDying = before.endpoint(cluster: "pool", address: dyingAddress)?.int("total") ?? -1
        XCTAssertGreaterThanOrEqual(served, 20)
        XCTAssertGreaterThanOrEqual(transitions, 1)
        func loggedTransitions() -> Int {
            proxy.log.components(separatedBy: "\n").filter { $0.contains("endpoint health changed") && $0.contains(dyingAddress) }.count
        }
        let loggedBefore = loggedTransitions()

        // Reloads that leave the endpoint alone: a listener and cluster added, then the
        // other endpoint's weight and the cluster's balancer changed.
        let extra = Sockets.freePort()
        config.extra = extra
        try proxy.writeConfig(config.yaml)
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        let afterFirst = try proxy.stats()
        config.pool = [(alive.address, 3), (dyingAddress, 1)]
        config.balancer = "least_request"
        try proxy.writeConfig(config.yaml)
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        let afterSecond = try proxy.stats()
        for stats in [afterFirst, afterSecond] {
            let endpoint = stats.endpoint(cluster: "pool", address: dyingAddress)
            XCTAssertEqual(endpoint?.bool("healthy"), false, "the reload flapped the endpoint back to healthy")
            XCTAssertEqual(endpoint?.int("health_transitions"), transitions)
            XCTAssertGreaterThanOrEqual(stats.endpoint(cluster: "pool", address: alive.address)?.int("total") ?? -1, served, "counters restarted")
        }
        // A reload that changes its check keeps the health it has (thresholds decide from
        // there): still unhealthy, not re-checked from scratch.
        config.healthCheck = "{ type: tcp, interval: 300ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 2 }"
        try proxy.writeConfig(config.yaml)
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        XCTAssertEqual(try proxy.stats().endpoint(cluster: "pool", address: dyingAddress)?.bool("healthy"), false)
        // It gets no traffic, and everything still works.
        for _ in 0..<20 { XCTAssertTrue(HealthTests.exchange(main)) }
        let after = try proxy.stats()
        XCTAssertEqual(after.endpoint(cluster: "pool", address: alive.address)?.int("total"), served + 20)
        XCTAssertEqual(after.endpoint(cluster: "pool", address: dyingAddress)?.int("total"), servedByDying)
        XCTAssertEqual(after.endpoint(cluster: "pool", address: dyingAddress)?.int("health_transitions"), transitions)
        XCTAssertEqual(loggedTransitions(), loggedBefore, "health transitions logged for the untouched endpoint:\n\(proxy.log)")
    }

    /// Must-show 3: an invalid reload (SIGHUP and POST /reload) names every error, the old
    /// config keeps serving, and `/stats` counts the failure.
    func testInvalidReloadNamesEveryErrorAndKeepsTheOldConfig() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let main = Sockets.freePort()
        let config = LiveConfig(main: main, extra: nil, pool: [(backend.address, 1)], side: [backend.address])
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }
        // A reload before every worker has taken the first snapshot is refused for that
        // reason alone; the listening port answers as soon as one worker has.
        XCTAssertTrue(waitUntil(timeout: 10) {
            ((try? proxy.stats())?["workers"] as? [[String: Any]])?.allSatisfy { ($0["generation"] as? Int) == 1 } ?? false
        })

        let invalid = config.yaml
            .replacingOccurrences(of: "balancer: round_robin", with: "balancer: fastest\n    bogus: 1")
            .replacingOccurrences(of: backend.address, with: "127.0.0.1:70000")
        try proxy.writeConfig(invalid)
        let response = try proxy.admin("POST", "/reload")
        XCTAssertEqual(response.status, 400)
        let errors = response.json["errors"] as? [String] ?? []
        for expected in ["clusters[0].balancer", "clusters[0].bogus", "clusters[0].endpoints[0].address", "clusters[1].endpoints[0].address"] {
            XCTAssertTrue(errors.contains { $0.hasPrefix(expected + ":") }, "no error for \(expected) in \(errors)")
        }
        XCTAssertTrue(HealthTests.exchange(main), "the old config stopped serving")

        proxy.process.signal(SIGHUP)
        XCTAssertNotNil(waitForLogLine(proxy, containing: ["reload failed", "clusters[0].bogus", "clusters[0].endpoints[0].address", "trigger=SIGHUP"], timeout: 5))
        XCTAssertTrue(HealthTests.exchange(main))

        // Valid YAML that a running process cannot take: a worker count, a listener whose
        // address is taken by someone else. Nothing of it is applied.
        let squatter = Sockets.freePort()
        let held = try Sockets.listen(host: "127.0.0.1", port: squatter)
        defer { close(held) }
        try proxy.writeConfig(config.yaml.replacingOccurrences(of: "workers: 2", with: "workers: 3"))
        let workers = try proxy.admin("POST", "/reload")
        XCTAssertEqual(workers.status, 400)
        XCTAssertTrue((workers.json["errors"] as? [String] ?? []).contains { $0.hasPrefix("workers: cannot change on reload") }, workers.text)
        var taken = config
        taken.extra = squatter
        try proxy.writeConfig(taken.yaml)
        let bind = try proxy.admin("POST", "/reload")
        XCTAssertEqual(bind.status, 400)
        XCTAssertTrue((bind.json["errors"] as? [String] ?? []).contains { $0.hasPrefix("listeners[1].address:") && $0.contains("Address already in use") }, bind.text)

        let stats = try proxy.stats()
        XCTAssertEqual(stats.int("generation"), 1)
        let reloads = stats["reloads"] as? [String: Any] ?? [:]
        XCTAssertEqual(reloads.int("failed"), 4)
        XCTAssertEqual(reloads.int("succeeded"), 0)
        XCTAssertEqual((reloads["last"] as? [String: Any])?.bool("succeeded"), false)
        let running = try proxy.admin("GET", "/config").json
        XCTAssertEqual((running["listeners"] as? [[String: Any]])?.count, 1)
        XCTAssertTrue(HealthTests.exchange(main))

        // And a valid one afterwards applies.
        try proxy.writeConfig(config.yaml)
        let fixed = try proxy.admin("POST", "/reload")
        XCTAssertEqual(fixed.status, 200, fixed.text)
        XCTAssertEqual(try proxy.stats().int("generation"), 2)
    }

    /// Must-show 4: after `l4lb drain`, new connections avoid the endpoint while its open
    /// ones carry on to completion; it stays drained across a reload; `--undo` restores it.
    func testDrainStopsNewConnectionsWhileOpenOnesFinish() throws {
        let a = try TestBackend(.echo)
        let b = try TestBackend(.echo)
        defer { a.stop(); b.stop() }
        let main = Sockets.freePort()
        var config = LiveConfig(main: main, extra: nil, pool: [(a.address, 1), (b.address, 1)], side: [a.address])
        // No health checks: every connection a backend accepts is a proxied one.
        config.healthCheck = nil
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }

        // Open connections spread over both endpoints.
        var open = try openEchoedConnections(10, port: main)
        defer { open.forEach { close($0) } }
        let onB = try proxy.stats().endpoint(cluster: "pool", address: b.address)?.int("active") ?? 0
        XCTAssertGreaterThan(onB, 0)
        let bTotal = b.accepted

        let drained = try proxy.runAdminCommand(["drain", "pool", b.address])
        XCTAssertEqual(drained.status, 0, drained.output)
        XCTAssertEqual(try proxy.stats().endpoint(cluster: "pool", address: b.address)?.bool("draining"), true)
        for _ in 0..<50 { XCTAssertTrue(HealthTests.exchange(main)) }
        XCTAssertEqual(b.accepted, bTotal, "a drained endpoint got new connections")

        // Its open connections still move bytes, across a reload too.
        try proxy.writeConfig(config.yaml.replacingOccurrences(of: "balancer: round_robin", with: "balancer: least_request"))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        XCTAssertEqual(try proxy.stats().endpoint(cluster: "pool", address: b.address)?.bool("draining"), true, "drain did not survive the reload")
        for _ in 0..<50 { XCTAssertTrue(HealthTests.exchange(main)) }
        XCTAssertEqual(b.accepted, bTotal)
        for fd in open {
            let payload = (0..<10_000).map { UInt8(truncatingIfNeeded: $0) }
            try Sockets.sendAll(fd, payload)
            XCTAssertEqual(try Sockets.receiveExactly(fd, payload.count), payload)
        }
        open.forEach { close($0) }
        open = []
        XCTAssertTrue(waitUntil(timeout: 5) { ((try? proxy.stats()) ?? [:]).endpoint(cluster: "pool", address: b.address)?.int("active") == 0 })

        let undone = try proxy.runAdminCommand(["drain", "pool", b.address, "--undo"])
        XCTAssertEqual(undone.status, 0, undone.output)
        for _ in 0..<20 { XCTAssertTrue(HealthTests.exchange(main)) }
        XCTAssertGreaterThan(b.accepted, bTotal, "undrained endpoint gets no connections")

        let unknown = try proxy.runAdminCommand(["drain", "pool", "127.0.0.1:9"])
        XCTAssertEqual(unknown.status, 1)
        XCTAssertTrue(unknown.output.contains("cluster \"pool\" has no endpoint 127.0.0.1:9"), unknown.output)
        XCTAssertEqual(try proxy.admin("POST", "/clusters/nope/endpoints/127.0.0.1:9/drain").status, 404)
    }

    /// Must-show 5: with a token, every admin endpoint but /healthz (and the dashboard page,
    /// which holds no data) answers 401 without it
    /// (and to a wrong one); the CLI says so. A non-loopback admin address without a token
    /// refuses to start.
    func testAdminTokenIsRequiredAndNonLoopbackNeedsOne() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let main = Sockets.freePort()
        var config = LiveConfig(main: main, extra: nil, pool: [(backend.address, 1)], side: [backend.address])
        config.adminPort = Sockets.freePort()
        config.token = "t0ken-\(UUID().uuidString)"
        let token = config.token!
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }

        let healthz = try proxy.admin("GET", "/healthz")
        XCTAssertEqual(healthz.status, 200)
        XCTAssertEqual(healthz.text, "ok\n")
        let guarded = [("GET", "/stats"), ("GET", "/config"), ("GET", "/metrics"), ("GET", "/blocklist"), ("POST", "/reload"),
                       ("POST", "/clusters/pool/endpoints/\(backend.address)/drain"),
                       ("DELETE", "/clusters/pool/endpoints/\(backend.address)/drain")]
        for (method, path) in guarded {
            XCTAssertEqual(try proxy.admin(method, path).status, 401, "\(method) \(path) without a token")
            XCTAssertEqual(try proxy.admin(method, path, token: "wrong").status, 401, "\(method) \(path) with a wrong token")
        }
        XCTAssertEqual(try proxy.stats(token: token).int("generation"), 1, "nothing above may have reloaded")
        for (method, path) in guarded {
            XCTAssertEqual(try proxy.admin(method, path, token: token).status, 200, "\(method) \(path) with the token")
        }
        XCTAssertFalse(try proxy.admin("GET", "/config", token: token).text.contains(token), "/config shows the token")

        let missing = try proxy.runAdminCommand(["stats"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.output.contains("requires a token"), missing.output)
        let wrong = try proxy.runAdminCommand(["stats", "--token", "wrong"])
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.output.contains("refused the token"), wrong.output)
        let table = try proxy.runAdminCommand(["stats"], environment: ["L4LB_ADMIN_TOKEN": token])
        XCTAssertEqual(table.status, 0, table.output)
        XCTAssertTrue(table.output.contains("LISTENER") && table.output.contains("main") && table.output.contains(backend.address.replacingOccurrences(of: "\"", with: "")), table.output)
        let json = try proxy.runAdminCommand(["stats", "--json", "--token", token])
        XCTAssertEqual(json.status, 0, json.output)
        XCTAssertNotNil(try? JSONSerialization.jsonObject(with: Data(json.output.utf8)), json.output)
        let reload = try proxy.runAdminCommand(["reload", "--token", token])
        XCTAssertEqual(reload.status, 0, reload.output)
        XCTAssertTrue(reload.output.contains("generation 3"), reload.output)
        let unreachable = try L4LBProcess.runCommand(["stats", "--admin", "http://127.0.0.1:\(Sockets.freePort())"])
        XCTAssertEqual(unreachable.status, 1)
        XCTAssertTrue(unreachable.output.contains("cannot reach the admin API"), unreachable.output)

        // Off loopback without a token: refused, by `check` and by `run`, saying why.
        var open = config
        open.token = nil
        let yaml = open.yaml.replacingOccurrences(of: "admin: { address: 127.0.0.1:", with: "admin: { address: 0.0.0.0:")
        let url = proxy.directory.appendingPathComponent("open.yaml")
        try yaml.write(to: url, atomically: true, encoding: .utf8)
        for command in ["check", "run"] {
            let result = try L4LBProcess.runCommand([command, "--config", url.path])
            XCTAssertEqual(result.status, 2, "\(command): \(result.output)")
            XCTAssertTrue(result.output.contains("admin.address: 0.0.0.0:") && result.output.contains("not a loopback address"), result.output)
        }
        // A token file makes it acceptable.
        let tokenFile = proxy.directory.appendingPathComponent("token")
        try "from-a-file\n".write(to: tokenFile, atomically: true, encoding: .utf8)
        try yaml.replacingOccurrences(of: "0.0.0.0:\(config.adminPort!) }", with: "0.0.0.0:\(config.adminPort!), token_file: \(tokenFile.path) }")
            .write(to: url, atomically: true, encoding: .utf8)
        let withFile = try L4LBProcess.runCommand(["check", "--config", url.path])
        XCTAssertEqual(withFile.status, 0, withFile.output)
    }

    /// A removed listener stops accepting at once; its open connections carry on, are
    /// listed as removed in `/stats`, and are closed once `drain_timeout` has passed.
    func testRemovedListenerFinishesWithinDrainTimeout() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let main = Sockets.freePort()
        let extra = Sockets.freePort()
        var config = LiveConfig(main: main, extra: extra, pool: [(backend.address, 1)], side: [backend.address])
        config.healthCheck = nil
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", extra))
        defer { proxy.stop() }
        let fd = try Sockets.connect(port: extra)
        defer { close(fd) }
        Sockets.setTimeout(fd, seconds: 10)
        try Sockets.sendAll(fd, Array("before".utf8))
        XCTAssertEqual(try Sockets.receiveExactly(fd, 6), Array("before".utf8))

        config.extra = nil
        try proxy.writeConfig(config.yaml.replacingOccurrences(of: "drain_timeout: 5s", with: "drain_timeout: 1s"))
        XCTAssertEqual(try proxy.admin("POST", "/reload").status, 200)
        let removedAt = Date()
        XCTAssertThrowsError(try Sockets.connect(port: extra, timeout: 2), "the removed listener still accepts")
        try Sockets.sendAll(fd, Array("after".utf8))
        XCTAssertEqual(try Sockets.receiveExactly(fd, 5), Array("after".utf8), "the open connection was disturbed")
        let listed = try proxy.stats().listener("extra")
        XCTAssertEqual(listed?.bool("removed"), true)
        XCTAssertEqual(listed?.int("active"), 1)

        let closedAfter = Sockets.waitForClose(fd, timeout: 5)
        XCTAssertNotNil(closedAfter, "not closed after drain_timeout")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(removedAt), 0.9, "closed before drain_timeout")
        XCTAssertNil(try proxy.stats().listener("extra"), "a removed listener with nothing open is still listed")
        XCTAssertTrue(HealthTests.exchange(main))
    }

    /// `on_unhealthy: close` also closes connections to an endpoint that was drained when
    /// it turned unhealthy (draining alone keeps them; unhealthy closes them).
    func testDrainedEndpointThatTurnsUnhealthyIsClosedUnderOnUnhealthyClose() throws {
        let a = try TestBackend(.echo)
        defer { a.stop() }
        let b = try ClosableEchoBackend()
        defer { b.stop() }
        let main = Sockets.freePort()
        var config = LiveConfig(main: main, extra: nil, pool: [(a.address, 1), (b.address, 1)], side: [a.address])
        config.healthCheck = "{ type: tcp, interval: 200ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 2 }\n    on_unhealthy: close"
        let proxy = try L4LBProcess(config: config.yaml, waitFor: ("127.0.0.1", main))
        defer { proxy.stop() }
        let open = try openEchoedConnections(8, port: main)
        defer { open.forEach { close($0) } }
        let onB = try proxy.stats().endpoint(cluster: "pool", address: b.address)?.int("active") ?? 0
        XCTAssertGreaterThan(onB, 0)
        XCTAssertEqual(try proxy.admin("POST", "/clusters/pool/endpoints/\(b.address)/drain").status, 200)
        // Drained: its connections stay.
        for fd in open {
            try Sockets.sendAll(fd, Array("ok".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, 2), Array("ok".utf8))
        }
        b.closeListener()
        XCTAssertTrue(waitUntil(timeout: 5) { open.filter { Sockets.isClosedByPeer($0) }.count == onB },
                      "connections to the drained endpoint were not closed when it turned unhealthy")
        let stats = try proxy.stats()
        XCTAssertEqual(stats.endpoint(cluster: "pool", address: b.address)?.bool("healthy"), false)
        XCTAssertEqual(stats.listener("main")?.int("closed_unhealthy"), onB)
        for fd in open where !Sockets.isClosedByPeer(fd) {
            try Sockets.sendAll(fd, Array("still".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, 5), Array("still".utf8), "a connection to the healthy endpoint was disturbed")
        }
    }
}

/// An echo server whose listening socket can be closed while its connections go on (a
/// backend that stops taking new connections and fails its health checks).
final class ClosableEchoBackend: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let lock = NSLock()
    private var connections: [Int32] = []

    let host: String

    /// Listens on `host` (in the calling thread's network namespace) on a free port.
    init(host: String = "127.0.0.1") throws {
        self.host = host
        port = Sockets.freePort()
        listener = try Sockets.listen(host: host, port: port)
        let listener = self.listener
        Thread { [self] in
            while true {
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { return }
                lock.withLock { connections.append(fd) }
                Thread {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    while true {
                        let n = recv(fd, &buffer, buffer.count, 0)
                        guard n > 0 else { return }
                        guard (try? Sockets.sendAll(fd, Array(buffer[..<n]))) != nil else { return }
                    }
                }.start()
            }
        }.start()
    }

    var address: String { "\(host):\(port)" }

    /// Connections accepted so far.
    var accepted: Int { lock.withLock { connections.count } }

    func closeListener() {
        shutdown(listener, Int32(SHUT_RDWR))
    }

    func stop() {
        closeListener()
        lock.withLock { connections.forEach { shutdown($0, Int32(SHUT_RDWR)) } }
        close(listener)
    }
}
