import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The admin API as an attacker meets it (issue 34): it cannot take the data plane's
/// descriptors or CPU, it does not keep sockets its clients have left, it does not answer a
/// rebinding page, and addresses with a NUL in them are refused, not cut short.
final class AdminHardeningTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// The blocklist's pinned maps of this test alone (runtime entries outlive the process).
    let pinPath = "/sys/fs/bpf/l4lb-admin-\(getpid())-\(UUID().uuidString.prefix(8))"

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: pinPath)
    }

    func config(port: UInt16, admin: UInt16, endpoints: [UInt16], adminExtra: String = "") -> String {
        """
        workers: 2
        admin: { address: 127.0.0.1:\(admin)\(adminExtra) }
        filter: { xdp: { interfaces: [], pin_path: \(pinPath) } }
        listeners:
          - { name: main, address: 127.0.0.1:\(port), cluster: pool }
        clusters:
          - name: pool
            health_check: { type: tcp, interval: 500ms, timeout: 500ms, unhealthy_threshold: 2 }
            endpoints: [\(endpoints.map { "{ address: \"127.0.0.1:\($0)\" }" }.joined(separator: ", "))]
        """
    }

    /// Sockets on the admin port in FIN-WAIT-2, or holding unread bytes, from `ss`.
    static func lingeringAdminSockets(_ port: UInt16) -> (finWait2: Int, withQueuedBytes: Int) {
        guard let out = try? ChildProcess.run("/usr/bin/ss", ["-tanH", "( sport = :\(port) )"]).output else { return (-1, -1) }
        var finWait = 0, queued = 0
        for line in out.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 3 else { continue }
            if f[0] == "FIN-WAIT-2" { finWait += 1 }
            if f[0] != "LISTEN", (Int(f[1]) ?? 0) > 0 { queued += 1 }
        }
        return (finWait, queued)
    }

    /// l4lb's own sockets on the admin port that still hold kernel memory: every state but
    /// LISTEN and TIME-WAIT (a TIME-WAIT entry holds no buffers). The clients' ends are not
    /// counted (their source port is not the admin port).
    static func heldAdminSockets(_ port: UInt16) -> [String] {
        guard let out = try? ChildProcess.run("/usr/bin/ss", ["-tanH", "( sport = :\(port) )"]).output else { return ["ss failed"] }
        return out.split(separator: "\n").compactMap { line in
            let state = line.split(separator: " ", omittingEmptySubsequences: true).first.map(String.init) ?? ""
            return state == "LISTEN" || state == "TIME-WAIT" || state.isEmpty ? nil : String(line)
        }
    }

    /// Round trips on 4 keep-alive connections through `port` until `done`: counts per
    /// second, for the rate the note gives.
    final class KeepAliveTraffic: @unchecked Sendable {
        private let lock = NSLock()
        private var count = 0
        private var errors: [String] = []
        private var stop = false
        private let group = DispatchGroup()

        init(port: UInt16) {
            for c in 0..<4 {
                group.enter()
                Thread.detachNewThread { [self] in
                    defer { group.leave() }
                    do {
                        let fd = try Sockets.connect(port: port)
                        defer { close(fd) }
                        Sockets.setTimeout(fd, seconds: 2)
                        let message = [UInt8](repeating: UInt8(c), count: 64)
                        while !lock.withLock({ stop }) {
                            try Sockets.sendAll(fd, message)
                            guard try Sockets.receiveExactly(fd, 64) == message else { throw Sockets.Failure("bytes differ", 0) }
                            lock.withLock { count += 1 }
                        }
                    } catch {
                        lock.withLock { errors.append("connection \(c): \(error)") }
                    }
                }
            }
        }

        var completed: Int { lock.withLock { count } }

        func finish() -> (count: Int, errors: [String]) {
            lock.withLock { stop = true }
            group.wait()
            return lock.withLock { (count, errors) }
        }
    }

    /// Must-show 2: 20,000 connections to the admin port (four processes of 5,000: idle,
    /// dripping a 60 KB body 16 bytes a second, or announcing 100 MB; whatever is cut
    /// reconnects at once) while
    /// keep-alive round trips run through a listener. The data plane keeps serving, every
    /// `/healthz` is answered, no endpoint is marked unhealthy, l4lb never holds more admin
    /// descriptors than its cap, and descriptors and the kernel's TCP memory come back to
    /// where they were within the admin timeouts.
    func testTwentyThousandAdminConnectionsCannotStarveTheDataPlane() throws {
        let backends = try (0..<2).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort(), admin = Sockets.freePort()
        let l4lb = try L4LBProcess(config: config(port: port, admin: admin, endpoints: backends.map(\.port),
                                                  adminExtra: ", max_connections: 64, idle_timeout: 2s, request_timeout: 2s"),
                                   waitFor: ("127.0.0.1", port))
        defer { l4lb.stop() }
        XCTAssertTrue(waitUntil(timeout: 10) {
            let endpoints = ((try? l4lb.stats())?["clusters"] as? [[String: Any]])?.first?["endpoints"] as? [[String: Any]] ?? []
            return endpoints.count == 2 && endpoints.allSatisfy { $0.bool("healthy") == true }
        })
        let traffic = KeepAliveTraffic(port: port)
        Thread.sleep(forTimeInterval: 2)
        let quietRate = Double(traffic.completed) / 2
        // With the keep-alive connections open: what l4lb holds for its data plane.
        let baseDescriptors = l4lb.resources.descriptors

        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Support/admin_flood.py").path
        let seconds = 15.0
        let floods = try (0..<4).map { i in
            // At the lowest priority: a remote attacker's CPU is not this machine's, and the
            // test measures what l4lb gives the data plane and /healthz, not the floods.
            try ChildProcess("/usr/bin/nice", ["-n", "19", "/usr/bin/python3", script, "127.0.0.1", "\(admin)", "5000", "\(seconds)"],
                             stdout: FileManager.default.temporaryDirectory.appendingPathComponent("admin-flood-\(admin)-\(i).json").path)
        }
        let attackStart = Date(), countAtStart = traffic.completed
        var healthz: [TimeInterval] = [], healthzFailures: [String] = [], mostDescriptors = 0, unhealthySeen = false
        while Date().timeIntervalSince(attackStart) < seconds - 1 {
            let asked = Date()
            do {
                // A monitor's patience: under a flood of reconnecting clients the accept
                // queue is full, and a probe's SYN may be dropped and retried (1 s, then 2 s).
                let response = try AdminHTTP.request(port: admin, "GET", "/healthz", connectTimeout: 10)
                if response.status == 200 { healthz.append(Date().timeIntervalSince(asked)) } else { healthzFailures.append("status \(response.status)") }
            } catch {
                healthzFailures.append("\(error) after \(String(format: "%.1f", Date().timeIntervalSince(asked))) s")
            }
            mostDescriptors = max(mostDescriptors, l4lb.resources.descriptors)
            if let stats = try? l4lb.stats(),
               let endpoints = (stats["clusters"] as? [[String: Any]])?.first?["endpoints"] as? [[String: Any]],
               endpoints.contains(where: { $0.bool("healthy") == false }) {
                unhealthySeen = true
            }
            usleep(300_000)
        }
        let attackRate = Double(traffic.completed - countAtStart) / Date().timeIntervalSince(attackStart)
        for flood in floods { XCTAssertNotNil(flood.wait(timeout: seconds + 30), "an admin flood did not stop") }
        let outcome = traffic.finish()
        let reports = (0..<4).compactMap { i in
            try? String(contentsOf: FileManager.default.temporaryDirectory.appendingPathComponent("admin-flood-\(admin)-\(i).json"), encoding: .utf8)
        }
        let latencies = healthz.sorted()
        print("admin flood: keep-alive round trips \(Int(quietRate))/s before, \(Int(attackRate))/s during; /healthz \(healthz.count) answered "
              + "(median \(Int((latencies.isEmpty ? 0 : latencies[latencies.count / 2]) * 1000)) ms, slowest \(Int((latencies.last ?? 0) * 1000)) ms), "
              + "\(healthzFailures.count) not; l4lb descriptors \(baseDescriptors) → at most \(mostDescriptors); floods: \(reports.joined(separator: " "))")

        XCTAssertEqual(outcome.errors, [], "the data plane failed during the admin flood")
        XCTAssertGreaterThan(attackRate, 0)
        XCTAssertEqual(healthzFailures, [], "/healthz went unanswered during the flood")
        XCTAssertGreaterThanOrEqual(healthz.count, 3)
        XCTAssertFalse(unhealthySeen, "an endpoint was marked unhealthy during the admin flood")
        XCTAssertFalse(l4lb.log.contains("to=unhealthy"), "health transitions during the flood:\n\(l4lb.log.suffix(2000))")
        XCTAssertLessThanOrEqual(mostDescriptors, baseDescriptors + 64 + 8, "the admin API held more descriptors than its cap")
        let stats = try l4lb.stats()
        let budget = try XCTUnwrap(stats["admin"] as? [String: Any])
        // Every kind of attacker met its end: the slow and idle ones by eviction or timeout.
        XCTAssertGreaterThan(budget.int("evicted"), 100, "\(budget)")
        XCTAssertGreaterThan(budget.int("oversized"), 100, "\(budget)")
        XCTAssertLessThanOrEqual(budget.int("open"), 64, "\(budget)")
        XCTAssertEqual(stats.int("health_checks_not_run"), 0)

        // Within the admin timeouts (2 s) of the flood's end, all of it is gone.
        XCTAssertTrue(waitUntil(timeout: 6) { l4lb.resources.descriptors <= baseDescriptors + 2 },
                      "descriptors \(l4lb.resources.descriptors), were \(baseDescriptors)")
        // What l4lb's end still holds, socket by socket. Not the host's TCP memory: that also
        // counts the flood's own client sockets (other processes), released at their pace
        // (once 455 pages 20 s after the flood on a clean CI machine, l4lb holding none).
        XCTAssertTrue(waitUntil(timeout: 6) { AdminHardeningTests.heldAdminSockets(admin).isEmpty },
                      "admin sockets l4lb still holds: \(AdminHardeningTests.heldAdminSockets(admin).prefix(10))")
        XCTAssertEqual(AdminHardeningTests.lingeringAdminSockets(admin).finWait2, 0)
    }

    /// A client that sends a body nobody reads, then reads the answer and leaves: the answer
    /// arrives, and within request_timeout l4lb resets, so no socket stays in FIN-WAIT-2
    /// holding the unread bytes (once ~148 MB of kernel memory for 113 clients). Bodies past
    /// the limit are reset at their head.
    func testUnreadBodiesAreResetAndLeaveNothingBehind() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort(), admin = Sockets.freePort()
        let l4lb = try L4LBProcess(config: config(port: port, admin: admin, endpoints: [backend.port], adminExtra: ", request_timeout: 2s"),
                                   waitFor: ("127.0.0.1", port))
        defer { l4lb.stop() }
        var answered = 0, reset = 0
        for i in 0..<113 {
            // Odd: a 100 MB body (refused at its head); even: 60 KB announced, half sent.
            let announced = i % 2 == 1 ? 100_000_000 : 60_000
            let fd = try Sockets.connect(port: admin)
            defer { close(fd) }
            Sockets.setTimeout(fd, seconds: 5)
            try Sockets.sendAll(fd, Array("POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(announced)\r\nConnection: close\r\n\r\n".utf8))
            Sockets.setNonBlocking(fd, true)
            let chunk = [UInt8](repeating: 0x61, count: 16_384)
            var sent = 0
            let until = Date().addingTimeInterval(1)
            while sent < min(announced / 2, 50_000_000), Date() < until {
                let n = send(fd, chunk, min(chunk.count, announced / 2 - sent), Int32(MSG_NOSIGNAL))
                if n > 0 { sent += n } else if errno == EAGAIN { usleep(1000) } else { break }
            }
            Sockets.setNonBlocking(fd, false)
            // What arrived before the reset (recv gives queued bytes first, then ECONNRESET).
            var response: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = recv(fd, &buffer, buffer.count, 0)
                if n <= 0 { break }
                response += buffer[..<n]
            }
            if String(decoding: response, as: UTF8.self).hasPrefix("HTTP/1.1 404") {
                answered += 1
            } else {
                reset += 1
            }
        }
        XCTAssertEqual(answered, 57, "the 404 for an unread body did not arrive")
        XCTAssertGreaterThan(reset, 0, "an oversized body was not cut at its head")
        // The bodies left unread go at request_timeout (2 s), the oversized ones at once.
        XCTAssertTrue(waitUntil(timeout: 6) { AdminHardeningTests.lingeringAdminSockets(admin) == (0, 0) },
                      "admin sockets left behind: \(AdminHardeningTests.lingeringAdminSockets(admin))")
        XCTAssertTrue(waitUntil(timeout: 5) { AdminHardeningTests.heldAdminSockets(admin).isEmpty },
                      "admin sockets l4lb still holds: \(AdminHardeningTests.heldAdminSockets(admin).prefix(10))")
        XCTAssertEqual(try l4lb.stats()["admin"].flatMap { $0 as? [String: Any] }?.int("oversized"), 56)
        XCTAssertEqual(try l4lb.admin("GET", "/healthz").status, 200)
    }

    /// Must-show 3: the shapes a DNS-rebinding page sends — a foreign Host with an Origin
    /// that matches it, or `Sec-Fetch-Site: same-origin` — are refused on every route that
    /// changes state and on `/stats`, and nothing changes; the same requests with the
    /// API's own Host (or a name in `allowed_hosts`) work.
    func testRebindingRequestsAreRefusedOnEveryRoute() throws {
        let backends = try (0..<2).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort(), admin = Sockets.freePort()
        let l4lb = try L4LBProcess(config: config(port: port, admin: admin, endpoints: backends.map(\.port), adminExtra: ", allowed_hosts: [lb.example]"),
                                   waitFor: ("127.0.0.1", port))
        defer { l4lb.stop() }
        let endpoint = "127.0.0.1:\(backends[0].port)"
        let routes: [(String, String, String)] = [
            ("POST", "/reload", ""),
            ("POST", "/blocklist", #"{"entry": "192.0.2.9/32"}"#),
            ("DELETE", "/blocklist", #"{"entry": "192.0.2.9/32"}"#),
            ("POST", "/clusters/pool/endpoints/\(endpoint)/drain", ""),
            ("DELETE", "/clusters/pool/endpoints/\(endpoint)/drain", ""),
            ("GET", "/stats", ""),
            ("GET", "/config", ""),
            ("GET", "/metrics", ""),
            ("GET", "/blocklist", ""),
        ]
        let foreign = "rebind.attacker.example:\(admin)"
        let shapes: [[String: String]] = [
            ["Host": foreign, "Origin": "http://\(foreign)"],
            ["Host": foreign, "Sec-Fetch-Site": "same-origin"],
            ["Host": foreign],
            ["Host": "LB.example.evil:\(admin)", "Origin": "http://LB.example.evil:\(admin)"],
        ]
        let reloadsBefore = (try l4lb.stats()["reloads"] as? [String: Any])?.int("succeeded")
        for (method, path, body) in routes {
            for shape in shapes {
                let response = try AdminHTTP.request(port: admin, method, path, headers: shape, body: body)
                XCTAssertEqual(response.status, 421, "\(method) \(path) with \(shape) answered: \(response.status) \(response.text)")
                XCTAssertFalse(response.text.contains("\"listeners\""), "data leaked to \(shape)")
            }
        }
        let stats = try l4lb.stats()
        XCTAssertEqual((stats["reloads"] as? [String: Any])?.int("succeeded"), reloadsBefore, "a rebinding request reloaded")
        XCTAssertEqual(stats.endpoint(cluster: "pool", address: endpoint)?.bool("draining"), false, "a rebinding request drained")
        XCTAssertFalse(try l4lb.admin("GET", "/blocklist").text.contains("192.0.2.9"), "a rebinding request blocked")

        // A state-changing request from a page of a name l4lb answers to, but another origin.
        let crossSite = try AdminHTTP.request(port: admin, "POST", "/reload", headers: ["Host": "127.0.0.1:\(admin)", "Origin": "http://evil.example"])
        XCTAssertEqual(crossSite.status, 403)
        // Without a token, changes need a loopback Host; a configured name may read.
        let named = try AdminHTTP.request(port: admin, "POST", "/reload", headers: ["Host": "lb.example:\(admin)"])
        XCTAssertEqual(named.status, 200, "a name in allowed_hosts: \(named.text)")
        XCTAssertEqual(try AdminHTTP.request(port: admin, "GET", "/stats", headers: ["Host": "lb.example"]).status, 200)
        XCTAssertEqual(try AdminHTTP.request(port: admin, "GET", "/stats", headers: ["Host": "localhost:\(admin)"]).status, 200)
        XCTAssertEqual(try AdminHTTP.request(port: admin, "GET", "/stats", headers: ["Host": "[::1]:\(admin)"]).status, 200)
        // /healthz answers whatever the Host (it says nothing but "ok").
        XCTAssertEqual(try AdminHTTP.request(port: admin, "GET", "/healthz", headers: ["Host": foreign]).status, 200)
        // The same changes with the API's own Host work: the refusals above were the Host's.
        let drained = try AdminHTTP.request(port: admin, "POST", "/clusters/pool/endpoints/\(endpoint)/drain")
        XCTAssertEqual(drained.status, 200, drained.text)
        let blocked = try AdminHTTP.request(port: admin, "POST", "/blocklist", body: #"{"entry": "192.0.2.9/32"}"#)
        XCTAssertEqual(blocked.status, 200, blocked.text)
    }

    /// Must-show 4's second half, over the admin API: an address or entry with a NUL is
    /// refused whole (once, `127.0.0.1%00garbage:PORT` drained 127.0.0.1:PORT and
    /// `127.0.0.2\u0000junk/32` blocked 127.0.0.2/32).
    func testAddressesWithANulAreRefusedNotCutShort() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort(), admin = Sockets.freePort()
        let l4lb = try L4LBProcess(config: config(port: port, admin: admin, endpoints: [backend.port]), waitFor: ("127.0.0.1", port))
        defer { l4lb.stop() }
        let endpoint = "127.0.0.1:\(backend.port)"
        let drain = try l4lb.admin("POST", "/clusters/pool/endpoints/127.0.0.1%00garbage:\(backend.port)/drain")
        XCTAssertEqual(drain.status, 400, drain.text)
        XCTAssertTrue(drain.text.contains("control character"), drain.text)
        XCTAssertEqual(try l4lb.stats().endpoint(cluster: "pool", address: endpoint)?.bool("draining"), false)
        for entry in [#"127.0.0.2\u0000junk/32"#, #"127.0.0.2/\u000032"#, #"tcp/80\u0000"#] {
            let response = try AdminHTTP.request(port: admin, "POST", "/blocklist", body: "{\"entry\": \"\(entry)\"}")
            XCTAssertEqual(response.status, 400, "\(entry): \(response.text)")
        }
        XCTAssertFalse(try l4lb.admin("GET", "/blocklist").text.contains("127.0.0.2"), "a NUL-bearing entry was added")
    }
}
