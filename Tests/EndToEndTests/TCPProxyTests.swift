import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The TCP data plane end to end: a real l4lb process, real sockets on loopback, in-test
/// backends.
final class TCPProxyTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    func startProxy(_ config: String, port: UInt16, host: String = "127.0.0.1", environment: [String: String] = [:]) throws -> L4LBProcess {
        try L4LBProcess(config: config, waitFor: (host, port), environment: environment)
    }

    /// 1,000 concurrent connections through 2 workers, 256 KiB each way: every byte identical.
    func testThousandConcurrentConnectionsEchoEveryByte() throws {
        let a = try TestBackend(.echo)
        let b = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try startProxy(proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [a.address, b.address]), port: port)
        let result = LoadClient.echo(port: port, connections: 1000, bytes: 256 * 1024, timeout: 180)
        XCTAssertEqual(result.completed, 1000, "failures: \(result.failed.prefix(5))")
        XCTAssertEqual(result.mismatched, 0)
        XCTAssertGreaterThan(a.accepted, 400)
        XCTAssertGreaterThan(b.accepted, 400)
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        // The warm-up probe connection plus the 1,000.
        XCTAssertEqual(summaryCounter(log, listener: "test", "bytes_in"), 1000 * 256 * 1024, log)
        XCTAssertEqual(summaryCounter(log, listener: "test", "bytes_out"), 1000 * 256 * 1024, log)
    }

    /// Batched waits start only under load: a lone request is never held for the window.
    /// With a 10 s window, so that a held completion would be unmistakable (each wait
    /// would then last up to its 1 s timeout), 40 one-byte round trips through l4lb finish
    /// long before the deadline.
    func testALoneRequestIsNotHeldForTheBatchWindow() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try startProxy(
            proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1),
            port: port, environment: ["L4LB_BATCH_US": "10000000"])
        let fd = try Sockets.connect(port: port, timeout: 10)
        let deadline = Date().addingTimeInterval(10)
        var completed = 0
        for i in 0..<40 where Date() < deadline {
            try Sockets.sendAll(fd, [UInt8(i)])
            XCTAssertEqual(try Sockets.receiveExactly(fd, 1), [UInt8(i)])
            completed += 1
        }
        close(fd)
        XCTAssertEqual(completed, 40, "lone requests waited for the batch window")
        proxy.stop()
    }

    /// Every endpoint dead (one refusing, one never answering): clients are closed within
    /// connect_timeout × connect_attempts, and counted.
    func testAllEndpointsDeadClosesClientsWithinTheConnectBudget() throws {
        let refused = Sockets.freePort()
        let blackhole = try Blackhole()
        let port = Sockets.freePort()
        let proxy = try startProxy(
            proxyConfig(
                listen: "127.0.0.1:\(port)", endpoints: ["127.0.0.1:\(refused)", "127.0.0.1:\(blackhole.port)"],
                listenerExtra: ["connect_timeout: 300ms", "connect_attempts: 3"]),
            port: port)
        var slowest: TimeInterval = 0
        for _ in 0..<10 {
            let fd = try Sockets.connect(port: port)
            guard let elapsed = Sockets.waitForClose(fd, timeout: 5) else {
                XCTFail("client not closed within 5 s")
                close(fd)
                continue
            }
            close(fd)
            slowest = max(slowest, elapsed)
        }
        XCTAssertGreaterThanOrEqual(slowest, 0.25, "no attempt waited for the connect timeout")
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        // 10 clients + the readiness probe. With two endpoints, each client tries both
        // once, and its third attempt finds none left untried.
        XCTAssertEqual(summaryCounter(log, listener: "test", "connect_failed"), 11, log)
        let attempts = (endpointCounter(log, endpoint: "127.0.0.1:\(refused)", "connect_failures") ?? 0)
            + (endpointCounter(log, endpoint: "127.0.0.1:\(blackhole.port)", "connect_failures") ?? 0)
        XCTAssertEqual(attempts, 2 * 11, "every client tries each endpoint once: \(log)")
        // Only the endpoint that never answers times out; the refusing one fails at once.
        XCTAssertEqual(endpointCounter(log, endpoint: "127.0.0.1:\(blackhole.port)", "connect_timeouts"), 11, log)
        XCTAssertEqual(endpointCounter(log, endpoint: "127.0.0.1:\(refused)", "connect_timeouts"), 0, log)
    }

    /// A connection idle past idle_timeout is closed on both sides.
    func testIdleTimeoutClosesBothSides() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try startProxy(
            proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], listenerExtra: ["idle_timeout: 1s"]), port: port)
        XCTAssertTrue(waitUntil(timeout: 5) { backend.closed == 1 })  // the readiness probe
        let fd = try Sockets.connect(port: port)
        try Sockets.sendAll(fd, Array("hello".utf8))
        XCTAssertEqual(try Sockets.receiveExactly(fd, 5), Array("hello".utf8))
        let elapsed = Sockets.waitForClose(fd, timeout: 5)
        close(fd)
        XCTAssertNotNil(elapsed, "idle connection was not closed")
        if let elapsed { XCTAssertGreaterThan(elapsed, 0.8, "closed before idle_timeout") }
        XCTAssertTrue(waitUntil(timeout: 3) { backend.closed == 2 }, "the upstream side stayed open")
        let (_, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(summaryCounter(log, listener: "test", "idle_timeouts"), 1, log)
    }

    /// An IPv6 listener in front of an IPv6 endpoint.
    func testIPv6ListenerAndEndpoint() throws {
        let backend = try TestBackend(.echo, host: "::1")
        let port = Sockets.freePort(host: "::1")
        let proxy = try startProxy(proxyConfig(listen: "\"[::1]:\(port)\"", endpoints: [backend.address]), port: port, host: "::1")
        let result = LoadClient.echo(host: "::1", port: port, connections: 20, bytes: 64 * 1024, timeout: 30)
        XCTAssertEqual(result.completed, 20, "\(result.failed.prefix(3))")
        proxy.stop()
    }

    /// PROXY protocol v1 and v2 headers parse to the client's address and port.
    func testProxyProtocolHeadersCarryTheClientAddress() throws {
        for version in ["v1", "v2"] {
            for (host, source, family) in [("127.0.0.1", "127.0.0.2", "TCP4"), ("::1", "::1", "TCP6")] {
                let backend = try TestBackend(.proxyProtocol, host: host)
                let port = Sockets.freePort(host: host)
                let listen = host.contains(":") ? "\"[\(host)]:\(port)\"" : "\(host):\(port)"
                let proxy = try startProxy(
                    proxyConfig(listen: listen, endpoints: [backend.address], listenerExtra: ["proxy_protocol: \(version)"]),
                    port: port, host: host)
                XCTAssertTrue(waitUntil(timeout: 5) { backend.headers.count == 1 }, "the readiness probe's header")
                let fd = try Sockets.connect(host: host, port: port, bindTo: source)
                let clientPort = Sockets.localPort(fd)
                try Sockets.sendAll(fd, Array("payload".utf8))
                XCTAssertEqual(try Sockets.receiveExactly(fd, 7), Array("payload".utf8), "payload after the header is relayed")
                close(fd)
                let headers = backend.headers
                // headers[0] is the readiness probe's.
                XCTAssertEqual(headers.count, 2, "\(version) \(family)")
                guard let header = headers.last, let parsed = ProxyHeaderParser.parse(header) else {
                    XCTFail("\(version) \(family): unparsable header \(String(decoding: headers.last ?? [], as: UTF8.self).debugDescription)")
                    proxy.stop()
                    continue
                }
                XCTAssertEqual(parsed, ProxyHeaderParser.Parsed(
                    version: version == "v1" ? 1 : 2, family: family, sourceIP: source, destinationIP: host,
                    sourcePort: clientPort, destinationPort: port), "header: \(String(decoding: header, as: UTF8.self).debugDescription)")
                proxy.stop()
                backend.stop()
            }
        }
    }

    /// SIGTERM: no new connection is accepted, open ones finish, exit 0.
    func testSigtermStopsAcceptingAndLetsOpenConnectionsFinish() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try startProxy(proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address]), port: port)
        let open = try Sockets.connect(port: port)
        try Sockets.sendAll(open, Array("before".utf8))
        XCTAssertEqual(try Sockets.receiveExactly(open, 6), Array("before".utf8))

        proxy.terminate()
        let refused = waitUntil(timeout: 3) {
            do {
                let fd = try Sockets.connect(port: port, timeout: 1)
                close(fd)
                return false
            } catch {
                return "\(error)".contains("errno \(ECONNREFUSED)")
            }
        }
        XCTAssertTrue(refused, "new connections are still accepted after SIGTERM")
        XCTAssertTrue(proxy.process.isRunning, "l4lb exited with a connection still open")

        try Sockets.sendAll(open, Array("after".utf8))
        XCTAssertEqual(try Sockets.receiveExactly(open, 5), Array("after".utf8), "the open connection stopped working")
        close(open)
        XCTAssertEqual(proxy.waitForExit(timeout: 10), 0, "l4lb did not exit once its last connection closed")
        proxy.stop()
    }

    /// Smooth weighted round robin 3:1 over 4,000 connections lands within ±2% of 75/25.
    func testRoundRobinWeightsThreeToOne() throws {
        let heavy = try TestBackend(.echo)
        let light = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try startProxy(
            proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [heavy.address, light.address], weights: [3, 1]), port: port)
        // The readiness probe made one connection; count from after it.
        XCTAssertTrue(waitUntil(timeout: 5) { heavy.accepted + light.accepted == 1 })
        let (heavyBefore, lightBefore) = (heavy.accepted, light.accepted)
        for _ in 0..<8 {
            let result = LoadClient.echo(port: port, connections: 500, bytes: 16, timeout: 30)
            XCTAssertEqual(result.completed, 500, "\(result.failed.prefix(3))")
        }
        XCTAssertTrue(waitUntil(timeout: 5) { heavy.accepted - heavyBefore + light.accepted - lightBefore == 4000 })
        let share = Double(heavy.accepted - heavyBefore) / 4000
        XCTAssertEqual(share, 0.75, accuracy: 0.02, "heavy \(heavy.accepted), light \(light.accepted)")
        proxy.stop()
    }
}

/// A TCP port whose SYNs go unanswered: a listener with a full accept queue.
final class Blackhole {
    let port: UInt16
    private let listener: Int32
    private var fillers: [Int32] = []

    init() throws {
        listener = try Sockets.listen(host: "127.0.0.1", port: 0, backlog: 0)
        port = Sockets.localPort(listener)
        // Fill the accept queue until a connect no longer completes.
        for _ in 0..<8 {
            guard let fd = try? Sockets.connect(port: port, timeout: 0.2) else { return }
            fillers.append(fd)
        }
        throw Sockets.Failure("blackhole: accept queue never filled", 0)
    }

    deinit {
        fillers.forEach { close($0) }
        close(listener)
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add(_ n: Int) { lock.withLock { count += n } }
    var value: Int { lock.withLock { count } }
}
