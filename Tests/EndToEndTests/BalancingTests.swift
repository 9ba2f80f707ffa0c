import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Balancers end to end: the l4lb process, real connections, backends that tell who they are.
final class BalancingTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    func config(listen port: UInt16, balancer: String, endpoints: [String], weights: [Int]? = nil, clusterExtra: [String] = [], workers: Int = 2) -> String {
        var lines = ["workers: \(workers)", "listeners:", "  - name: test", "    address: 127.0.0.1:\(port)", "    cluster: backends",
                     "clusters:", "  - name: backends", "    balancer: \(balancer)"]
        lines += clusterExtra.map { "    " + $0 }
        lines.append("    endpoints:")
        for (i, e) in endpoints.enumerated() { lines.append("      - { address: \(e), weight: \(weights?[i] ?? 1) }") }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Which backend served a connection from `source`.
    func servedBy(port: UInt16, source: String) throws -> String {
        let fd = try Sockets.connect(port: port, bindTo: source)
        defer { close(fd) }
        var name: [UInt8] = []
        while name.last != 0x0A {
            let byte = try Sockets.receiveExactly(fd, 1)
            name += byte
        }
        return String(decoding: name.dropLast(), as: UTF8.self)
    }

    /// 3 backends, one answering 10× slower: least_request sends it clearly fewer of 3,000
    /// connections; with weights 1:1:4 the heavy one gets the most.
    func testLeastRequestAvoidsTheSlowEndpointAndHonoursWeights() throws {
        let fast1 = try TestBackend(.delayedEcho(milliseconds: 2))
        let fast2 = try TestBackend(.delayedEcho(milliseconds: 2))
        let slow = try TestBackend(.delayedEcho(milliseconds: 20))
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: config(listen: port, balancer: "least_request", endpoints: [fast1.address, fast2.address, slow.address]),
            waitFor: ("127.0.0.1", port))
        XCTAssertTrue(waitUntil(timeout: 5) { fast1.accepted + fast2.accepted + slow.accepted == 1 })
        let before = (fast1.accepted, fast2.accepted, slow.accepted)
        let result = LoadClient.echo(port: port, connections: 3000, concurrency: 24, bytes: 16, timeout: 120)
        XCTAssertEqual(result.completed, 3000, "\(result.failed.prefix(3))")
        let counts = [fast1.accepted - before.0, fast2.accepted - before.1, slow.accepted - before.2]
        print("least_request with one endpoint 10x slower: fast \(counts[0]), fast \(counts[1]), slow \(counts[2])")
        XCTAssertLessThan(Double(counts[2]), 0.6 * Double(min(counts[0], counts[1])), "\(counts)")
        proxy.stop()

        let a = try TestBackend(.echo)
        let b = try TestBackend(.echo)
        let heavy = try TestBackend(.echo)
        let port2 = Sockets.freePort()
        let weighted = try L4LBProcess(
            config: config(listen: port2, balancer: "least_request", endpoints: [a.address, b.address, heavy.address], weights: [1, 1, 4]),
            waitFor: ("127.0.0.1", port2))
        let r2 = LoadClient.echo(port: port2, connections: 3000, concurrency: 24, bytes: 16, timeout: 120)
        XCTAssertEqual(r2.completed, 3000, "\(r2.failed.prefix(3))")
        print("least_request weights 1:1:4: \(a.accepted), \(b.accepted), \(heavy.accepted)")
        XCTAssertGreaterThan(heavy.accepted, 2 * max(a.accepted, b.accepted))
        weighted.stop()
    }

    /// 100 client addresses × 20 connections through maglev on 2 workers: every address
    /// always lands on the same endpoint, whichever worker accepted it.
    func testMaglevKeepsEachSourceAddressOnOneEndpoint() throws {
        let backends = try (0..<4).map { try TestBackend(.identify("backend-\($0)")) }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: config(listen: port, balancer: "maglev", endpoints: backends.map(\.address)), waitFor: ("127.0.0.1", port))
        var served: [String: Set<String>] = [:]
        var used: Set<String> = []
        for round in 0..<20 {
            for host in 1...100 {
                let source = "127.0.0.\(host + 1)"
                let name = try servedBy(port: port, source: source)
                served[source, default: []].insert(name)
                used.insert(name)
                if round == 0, host == 1 { XCTAssertTrue(name.hasPrefix("backend-")) }
            }
        }
        let moved = served.filter { $0.value.count > 1 }
        XCTAssertTrue(moved.isEmpty, "addresses that changed endpoint: \(moved.prefix(5))")
        XCTAssertEqual(used.count, 4, "100 addresses should spread over all 4 endpoints: \(used)")
        proxy.stop()
    }

    /// A 300-endpoint Maglev cluster with 290 endpoints down (health checks fail: nothing
    /// listens there): every one of 200 client addresses is served by one of the 10 left.
    /// A key's probe sequence alone misses all 10 for about one key in nine.
    func testMaglevWithMostOfALargeClusterDownServesEveryClient() throws {
        let up = try (0..<10).map { try TestBackend(.identify("up-\($0)")) }
        var endpoints = (1...290).map { "127.0.1.\($0 % 250 + 1):\(9000 + $0 / 250)" }
        // The live ones spread through the cluster's order.
        for (i, backend) in up.enumerated() { endpoints.insert(backend.address, at: i * 30) }
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: config(
                listen: port, balancer: "maglev", endpoints: endpoints,
                clusterExtra: ["health_check: { type: tcp, interval: 500ms, timeout: 200ms }"]),
            waitFor: ("127.0.0.1", port))
        var used: Set<String> = []
        var failures: [String] = []
        for host in 1...200 {
            let source = "127.0.2.\(host)"
            do {
                used.insert(try servedBy(port: port, source: source))
            } catch {
                failures.append("\(source): \(error)")
            }
        }
        XCTAssertEqual(failures, [], "clients left unserved while 10 endpoints were up")
        XCTAssertEqual(used, Set((0..<10).map { "up-\($0)" }), "200 addresses should reach all 10 endpoints left")
        let (_, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(summaryCounter(log, listener: "test", "connect_failed"), 0, log)
    }

    /// A 95/5 canary split over 10,000 connections lands within ±1 percentage point.
    func testCanarySplitNinetyFiveFive() throws {
        let stable = try TestBackend(.echo)
        let canary = try TestBackend(.echo)
        let port = Sockets.freePort()
        let yaml = """
            workers: 2
            listeners:
              - name: web
                address: 127.0.0.1:\(port)
                clusters: [{ name: v1, weight: 95 }, { name: v2, weight: 5 }]
            clusters:
              - { name: v1, endpoints: [{ address: \(stable.address) }] }
              - { name: v2, endpoints: [{ address: \(canary.address) }] }
            """
        let proxy = try L4LBProcess(config: yaml, waitFor: ("127.0.0.1", port))
        XCTAssertTrue(waitUntil(timeout: 5) { stable.accepted + canary.accepted == 1 })
        let before = (stable.accepted, canary.accepted)
        for _ in 0..<20 {
            let r = LoadClient.echo(port: port, connections: 500, bytes: 8, timeout: 30)
            XCTAssertEqual(r.completed, 500, "\(r.failed.prefix(3))")
        }
        XCTAssertTrue(waitUntil(timeout: 5) { stable.accepted - before.0 + canary.accepted - before.1 == 10_000 })
        let share = Double(canary.accepted - before.1) / 10_000
        print("canary share over 10,000 connections: \(share * 100)%")
        XCTAssertEqual(share, 0.05, accuracy: 0.01)
        proxy.stop()
    }

    /// Two l4lb processes given the same endpoints in different orders build the same
    /// Maglev table (so a fleet behind ECMP agrees on where a flow goes).
    func testMaglevTablesAgreeAcrossProcessesAndConfigOrder() throws {
        let addresses = (1...40).map { "198.51.100.\($0):443" }
        func digest(_ list: [String]) throws -> String {
            let yaml = config(listen: 9, balancer: "maglev", endpoints: list, weights: list.map { Int($0.split(separator: ".")[3].split(separator: ":")[0])! % 3 + 1 })
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("maglev-\(UUID().uuidString).yaml")
            try yaml.write(to: url, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: url) }
            let (status, output) = try L4LBProcess.runCommand(["check", "--config", url.path, "--show-tables"])
            XCTAssertEqual(status, 0, output)
            return output.split(separator: "\n").first { $0.hasPrefix("cluster backends: maglev") }.map(String.init) ?? "none: \(output)"
        }
        let first = try digest(addresses)
        let second = try digest(addresses.reversed())
        let third = try digest(addresses.shuffled())
        XCTAssertTrue(first.hasPrefix("cluster backends: maglev table_size=65537 digest="), first)
        XCTAssertEqual(first, second)
        XCTAssertEqual(first, third)
        XCTAssertNotEqual(first, try digest(Array(addresses.dropLast())), "a different endpoint set must differ")
    }
}
