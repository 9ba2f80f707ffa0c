import Foundation
import XCTest

/// The data path allocates nothing per connection and per datagram (DESIGN §3): l4lb runs
/// under a counting malloc (LD_PRELOAD of Sources/CMallocCounter, which prints the
/// process's count at exit) for N and for 6N proxied connections (or datagrams), and the
/// difference divided by 5N is what one costs. Start-up, reloads and the control side are
/// the same in both runs and cancel out. `bench/allocations/run.sh` is the same
/// measurement by hand.
final class AllocationTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let counter: String = {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-malloc-count-\(getpid())")
        try? FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let library = directory.appendingPathComponent("malloc_count.so").path
        let sources = AllocationTests.root.appendingPathComponent("Sources/CMallocCounter")
        let report = AllocationTests.root.appendingPathComponent("bench/allocations/report.c")
        let (status, output) = (try? ChildProcess.run("/usr/bin/cc", [
            "-O2", "-shared", "-fPIC", "-I", sources.appendingPathComponent("include").path, "-o", library,
            sources.appendingPathComponent("CMallocCounter.c").path, report.path,
        ])) ?? (-1, "cc did not run")
        precondition(status == 0, "building the malloc counter failed: \(output)")
        return library
    }()

    /// Runs l4lb under the counter while `traffic` runs, and returns the count at exit.
    func allocations(config: String, port: UInt16, udp: Bool = false, _ traffic: () throws -> Void) throws -> Int {
        let proxy = try L4LBProcess(
            config: config, waitFor: udp ? nil : ("127.0.0.1", port), environment: ["LD_PRELOAD": AllocationTests.counter])
        if udp {
            // Serving once a datagram comes back (the probe's session is in both runs).
            let probe = try UDPClient.connect(host: "127.0.0.1", port: port, timeout: 0.2)
            defer { close(probe) }
            XCTAssertTrue(waitUntil(timeout: 10) { UDPClient.exchange(probe, [0x70]) == [0x70] }, "l4lb never answered")
        }
        try traffic()
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0, log)
        guard let match = log.firstMatch(of: /malloc_count: (\d+)/), let count = Int(match.1) else {
            XCTFail("no malloc_count line in the log:\n\(log.suffix(2000))")
            return 0
        }
        return count
    }

    /// Allocations for `n` and `6n` units of traffic: what one more unit costs.
    func perUnit(_ n: Int, _ unit: String, _ measure: (Int) throws -> Int) throws -> Double {
        let few = try measure(n)
        let many = try measure(6 * n)
        let each = Double(many - few) / Double(5 * n)
        print("allocations: \(few) for \(n) \(unit), \(many) for \(6 * n): \(each) per one")
        return each
    }

    func testAProxiedTCPConnectionAllocatesNothing() throws {
        let backend = try TestBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let config = """
            workers: 1
            drain_timeout: 1s
            listeners: [{ name: web, address: "127.0.0.1:\(port)", cluster: app }]
            clusters: [{ name: app, endpoints: [{ address: "127.0.0.1:\(backend.port)" }] }]
            """
        let payload = [UInt8](repeating: 0x61, count: 500)
        func connections(_ count: Int) throws -> Int {
            try allocations(config: config, port: port) {
                for _ in 0..<count {
                    let fd = try Sockets.connect(port: port)
                    defer { close(fd) }
                    try Sockets.sendAll(fd, payload)
                    XCTAssertEqual(try Sockets.receiveExactly(fd, payload.count), payload)
                }
            }
        }
        // One allocation per connection would be 1.0; the margin is for the control side's
        // timers, which run a few more times in the longer run.
        XCTAssertLessThan(try perUnit(200, "connections", connections), 0.05, "heap allocations per proxied connection")
    }

    func testARelayedDatagramAllocatesNothing() throws {
        let backend = try UDPBackend(.echo)
        defer { backend.stop() }
        let port = Sockets.freePort()
        let config = """
            workers: 1
            drain_timeout: 1s
            listeners: [{ name: dns, address: "127.0.0.1:\(port)", protocol: udp, cluster: app }]
            clusters: [{ name: app, endpoints: [{ address: "\(backend.address)" }] }]
            """
        func datagrams(_ count: Int) throws -> Int {
            try allocations(config: config, port: port, udp: true) {
                // Ten clients: sessions are opened in both runs alike; the datagrams differ.
                let clients = try (0..<10).map { _ in try UDPClient.connect(host: "127.0.0.1", port: port) }
                defer { clients.forEach { close($0) } }
                for i in 0..<count {
                    let payload = Array("datagram \(i)".utf8)
                    XCTAssertEqual(UDPClient.exchange(clients[i % clients.count], payload), payload)
                }
            }
        }
        XCTAssertLessThan(try perUnit(500, "datagrams", datagrams), 0.05, "heap allocations per relayed datagram")
    }
}
