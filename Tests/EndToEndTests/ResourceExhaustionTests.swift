import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Running out of resources degrades and recovers; it never crashes l4lb.
final class ResourceExhaustionTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// Out of file descriptors for real: l4lb's own RLIMIT_NOFILE is lowered to 64 while it
    /// runs, so the upstream socket (or accept) fails with EMFILE. Clients beyond the limit
    /// are refused (closed at once) or wait in the listen queue, and every one is counted;
    /// l4lb keeps running, says why, and serves again once descriptors free up.
    func testRunningOutOfFileDescriptorsDegradesAndRecovers() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1), waitFor: ("127.0.0.1", port))
        let squeeze = try ChildProcess.run("/usr/bin/prlimit", ["--pid", "\(proxy.pid)", "--nofile=64:64"])
        XCTAssertEqual(squeeze.status, 0, squeeze.output)

        // Each client sends its ping at once; an answer means l4lb accepted and proxied it.
        var served: [Int32] = []
        var unserved: [Int32] = []
        for i in 0..<40 {
            let fd = try Sockets.connect(port: port, timeout: 5)
            try Sockets.sendAll(fd, Array("ping\(i % 10)".utf8))
            Sockets.setTimeout(fd, seconds: 1)
            if (try? Sockets.receiveExactly(fd, 5)) == Array("ping\(i % 10)".utf8) { served.append(fd) } else { unserved.append(fd) }
        }
        XCTAssertGreaterThan(served.count, 5)
        XCTAssertGreaterThan(unserved.count, 0, "the limit was never reached")
        XCTAssertTrue(proxy.process.isRunning, "l4lb died when it ran out of descriptors")

        // Free descriptors. Each unserved client was either refused (closed by l4lb) or is
        // still waiting to be accepted, and then gets its answer.
        served.forEach { close($0) }
        var refused = 0
        var servedLate = 0
        for fd in unserved {
            Sockets.setTimeout(fd, seconds: 5)
            var reply = [UInt8](repeating: 0, count: 5)
            if recv(fd, &reply, 5, Int32(MSG_WAITALL)) == 5 { servedLate += 1 } else { refused += 1 }
            close(fd)
        }
        print("with 64 descriptors: \(served.count) clients served, \(refused) refused, \(servedLate) served once descriptors were free")
        let recovered = waitUntil(timeout: 5) {
            guard let fd = try? Sockets.connect(port: port, timeout: 1) else { return false }
            defer { close(fd) }
            Sockets.setTimeout(fd, seconds: 1)
            guard (try? Sockets.sendAll(fd, Array("fresh".utf8))) != nil else { return false }
            return (try? Sockets.receiveExactly(fd, 5)) == Array("fresh".utf8)
        }
        XCTAssertTrue(recovered, "l4lb did not serve new clients after descriptors were freed")
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertTrue(log.contains("out of file descriptors"), "EMFILE was not reported: \(log)")
        let acceptErrors = summaryCounter(log, listener: "test", "accept_errors") ?? 0
        let connectFailed = summaryCounter(log, listener: "test", "connect_failed") ?? 0
        XCTAssertGreaterThanOrEqual(connectFailed + acceptErrors, refused, "refused clients were not all counted: \(log)")
        XCTAssertGreaterThan(connectFailed + acceptErrors, 0, log)
    }

    /// l4lb's own EMFILE is l4lb's failure, not the endpoint's (issue 34): while l4lb has no
    /// descriptor to spare, a health check that cannot open its socket neither passes nor
    /// fails, so the endpoint is not marked unhealthy (and need not climb back through
    /// `healthy_threshold` when l4lb recovers); the skipped checks are counted.
    func testOutOfDescriptorsHealthChecksDoNotFailTheEndpoint() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let config = proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1)
            + "    health_check: { type: tcp, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1 }\n"
        let proxy = try L4LBProcess(config: config, waitFor: ("127.0.0.1", port))
        XCTAssertTrue(waitUntil(timeout: 5) { (try? proxy.stats())?.endpoint(cluster: "backends", address: backend.address)?.bool("healthy") == true })
        let transitions = try XCTUnwrap(try proxy.stats().endpoint(cluster: "backends", address: backend.address)).int("health_transitions")
        let squeeze = try ChildProcess.run("/usr/bin/prlimit", ["--pid", "\(proxy.pid)", "--nofile=64:64"])
        XCTAssertEqual(squeeze.status, 0, squeeze.output)
        // Proxied clients take every descriptor l4lb has, and keep them for ten check rounds.
        var clients: [Int32] = []
        for i in 0..<40 {
            let fd = try Sockets.connect(port: port, timeout: 5)
            try Sockets.sendAll(fd, Array("ping\(i % 10)".utf8))
            clients.append(fd)
        }
        Thread.sleep(forTimeInterval: 1)
        clients.forEach { close($0) }
        XCTAssertTrue(waitUntil(timeout: 10) { (try? proxy.stats()) != nil }, "the admin API did not come back")
        let stats = try proxy.stats()
        XCTAssertGreaterThan(stats.int("health_checks_not_run"), 0, "the checks never met EMFILE: the test squeezed nothing")
        let endpoint = try XCTUnwrap(stats.endpoint(cluster: "backends", address: backend.address))
        XCTAssertEqual(endpoint.bool("healthy"), true)
        XCTAssertEqual(endpoint.int("health_transitions"), transitions, "the endpoint's health changed while l4lb was out of descriptors")
        let (_, log) = proxy.stopAndCollectLog()
        XCTAssertTrue(log.contains("health check not run: l4lb is short of resources"), log)
        XCTAssertFalse(log.contains("to=unhealthy"), log)
    }
}
