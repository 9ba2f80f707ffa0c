import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Peers that stop reading, at the scale an adversary brings: thousands of clients that
/// never read a download that never ends, thousands of uploads to an upstream that never
/// reads. They must cost what the buffer contract says and no more, must not starve
/// anyone else on the same workers, and must be closed by the send timeout.
final class HostileLoadTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    static let stalledPerKind = 2000
    static let freshClients = 1000
    static let workers = 2
    static let sendTimeout = 8

    func testStalledReadersAndUploadersDoNotStarveFreshClients() throws {
        let firehose = try HostileBackend(.firehose, socketBuffer: 16384)
        let blackhole = try HostileBackend(.neverReads, socketBuffer: 4096)
        let echo = try TestBackend(.echo)
        let downloadPort = Sockets.freePort()
        let uploadPort = Sockets.freePort()
        let freshPort = Sockets.freePort()
        let config = """
            workers: \(HostileLoadTests.workers)
            drain_timeout: 1s
            listeners:
              - { name: download, address: "127.0.0.1:\(downloadPort)", cluster: firehose, send_timeout: \(HostileLoadTests.sendTimeout)s }
              - { name: upload, address: "127.0.0.1:\(uploadPort)", cluster: blackhole, send_timeout: \(HostileLoadTests.sendTimeout)s }
              - { name: fresh, address: "127.0.0.1:\(freshPort)", cluster: echo }
            clusters:
              - { name: firehose, endpoints: [{ address: \(firehose.address) }] }
              - { name: blackhole, endpoints: [{ address: \(blackhole.address) }] }
              - { name: echo, endpoints: [{ address: \(echo.address) }] }
            """
        let proxy = try L4LBProcess(config: config, waitFor: ("127.0.0.1", freshPort))

        // Unloaded: the reference for the fresh clients' latency.
        let unloaded = FreshClients.run(port: freshPort, clients: HostileLoadTests.freshClients)
        XCTAssertEqual(unloaded.failures, [], "unloaded fresh clients failed")
        let baselineRSS = proxy.memoryKiB("VmRSS")

        // The hostile load: readers with a tiny receive buffer that never read; uploaders
        // that write whenever they can to an upstream that never reads.
        let stalled = HostileLoadTests.stalledPerKind
        var readers: [Int32] = []
        for _ in 0..<stalled { readers.append(try Sockets.connect(port: downloadPort, receiveBuffer: 4096)) }
        let uploads = Uploaders(fds: try (0..<stalled).map { _ in try Sockets.connect(port: uploadPort, sendBuffer: 16384) })
        defer {
            uploads.stop()
            readers.forEach { close($0) }
        }
        XCTAssertTrue(waitUntil(timeout: 20) { firehose.accepted == stalled && blackhole.accepted == stalled },
                      "upstream connections: \(firehose.accepted) firehose, \(blackhole.accepted) blackhole")
        // Settled: the uploads have stopped moving (every buffer on the way is full).
        XCTAssertTrue(uploads.waitUntilStalled(quietFor: 0.5, timeout: 20), "uploads never stalled")
        XCTAssertTrue(proxy.waitUntilQuiet(timeout: 20), "l4lb never went quiet")
        let loadedBeforeRSS = proxy.memoryKiB("VmRSS")
        // The pool as /stats (and l4lb_worker_buffers_in_use) sees it: the stalled
        // directions hold buffers, within the per-direction bound.
        func buffersInUse() -> Int {
            ((try? proxy.stats())?["workers"] as? [[String: Any]] ?? []).reduce(0) { $0 + $1.int("small_buffers_in_use") + $1.int("large_buffers_in_use") }
        }
        let heldWhileStalled = buffersInUse()
        XCTAssertGreaterThan(heldWhileStalled, 0, "stalled directions hold no buffers?")
        XCTAssertLessThanOrEqual(heldWhileStalled, 2 * 2 * stalled, "buffers held by \(2 * stalled) stalled directions")

        let cpuBefore = proxy.cpuSeconds
        let loaded = FreshClients.run(port: freshPort, clients: HostileLoadTests.freshClients)
        print("l4lb CPU during the loaded run: \(proxy.cpuSeconds - cpuBefore) s; before it: \(cpuBefore) s")
        let loadedRSS = max(loadedBeforeRSS, proxy.memoryKiB("VmRSS"))
        // The load was still in place for the whole run.
        XCTAssertEqual(firehose.closed, 0, "stalled downloads ended before the fresh clients were measured")
        XCTAssertEqual(blackhole.closed, 0, "stalled uploads ended before the fresh clients were measured")
        XCTAssertEqual(loaded.failures, [], "fresh clients went unanswered while \(2 * stalled) peers were stalled")
        let (p99Unloaded, p99Loaded) = (unloaded.percentile(0.99), loaded.percentile(0.99))
        print(String(format: "fresh clients p99: unloaded %.2f ms, with %d stalled peers %.2f ms; l4lb RSS %d → %d KiB",
                     p99Unloaded * 1000, 2 * stalled, p99Loaded * 1000, baselineRSS, loadedRSS))
        // Within 2× of the unloaded run; on a shared 2-core machine a sub-millisecond p99
        // moves by more than that with no load at all (a slow spell of the host once read
        // 92 ms here, with the whole suite running 20% slower), so the floor is 100 ms
        // unless L4LB_STRICT_LATENCY=1. A starved worker answers in seconds or never, and
        // the failures check above catches a client that gets no answer at all.
        let strict = ProcessInfo.processInfo.environment["L4LB_STRICT_LATENCY"] == "1"
        XCTAssertLessThanOrEqual(p99Loaded, max(2 * p99Unloaded, strict ? 0 : 0.100), "fresh clients' p99 under load")

        // The buffer contract: a stalled direction holds at most two small buffers or one
        // large one (and large buffers are `large` per worker); on top, the buffers of the
        // kernel's window. Everything else is the connection slab (~120 B a connection).
        let smallSize = 16 * 1024
        let bound = (2 * stalled * 2 * smallSize + HostileLoadTests.workers * (16 * 1024 * 1024 + 1024 * smallSize)) / 1024 + 16 * 1024
        XCTAssertLessThan(loadedRSS - baselineRSS, bound, "l4lb's RSS grew \(loadedRSS - baselineRSS) KiB; the contract bounds it at \(bound) KiB")

        // The send timeout closes every stalled peer, upstream side too, and counts it.
        XCTAssertTrue(waitUntil(timeout: Double(HostileLoadTests.sendTimeout) + 20) {
            firehose.closed == stalled && blackhole.closed == stalled
        }, "send timeout: \(firehose.closed) downloads and \(blackhole.closed) uploads closed of \(stalled) each")
        XCTAssertTrue(waitUntil(timeout: 10) { readers.allSatisfy(Sockets.isClosedByPeer) }, "a stalled reader was left open")
        XCTAssertTrue(waitUntil(timeout: 10) { uploads.allClosedByPeer }, "a stalled uploader was left open")

        // Back to normal.
        let after = FreshClients.run(port: freshPort, clients: HostileLoadTests.freshClients)
        XCTAssertEqual(after.failures, [], "fresh clients failed after the stalled peers were closed")
        // Every buffer back in the pool.
        XCTAssertTrue(waitUntil(timeout: 5) { buffersInUse() == 0 }, "buffers still in use: \(buffersInUse())")

        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertEqual(summaryCounter(log, listener: "download", "send_timeouts"), stalled, log)
        XCTAssertEqual(summaryCounter(log, listener: "upload", "send_timeouts"), stalled, log)
        // The fresh runs, and the probe that saw l4lb start.
        XCTAssertEqual(summaryCounter(log, listener: "fresh", "accepted"), 3 * HostileLoadTests.freshClients + 1, log)
        var peak = 0
        for worker in 0..<HostileLoadTests.workers {
            peak += workerCounter(log, worker: worker, "small_buffers_peak") ?? .max / 4
            XCTAssertEqual(workerCounter(log, worker: worker, "submission_drops"), 0, log)
        }
        // Two per stalled direction at most, plus what the fresh clients (8 at a time, two
        // directions) had in flight.
        XCTAssertLessThanOrEqual(peak, 2 * 2 * stalled + 2 * 2 * FreshClients.concurrency, "small buffers in use at the peak")
        print("small buffers in use at the peak, both workers: \(peak) for \(2 * stalled) stalled directions")
    }
}

/// Request/response clients: connect, send 100 random bytes, read them back, close;
/// `concurrency` at a time. Records each client's time from connect to answer.
enum FreshClients {
    static let concurrency = 8

    struct Result {
        var latencies: [TimeInterval]
        var failures: [String]

        func percentile(_ p: Double) -> TimeInterval {
            let sorted = latencies.sorted()
            guard !sorted.isEmpty else { return .infinity }
            return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        }
    }

    static func run(port: UInt16, clients: Int) -> Result {
        let box = ResultBox()
        let group = DispatchGroup()
        for worker in 0..<concurrency {
            group.enter()
            Thread {
                var random = FastRandomBytes(seed: UInt64(worker) &+ 1)
                var i = worker
                while i < clients {
                    let started = Date()
                    let payload = random.bytes(100)
                    do {
                        let fd = try Sockets.connect(port: port, timeout: 5)
                        defer { close(fd) }
                        try Sockets.sendAll(fd, payload)
                        let answer = try Sockets.receiveExactly(fd, payload.count)
                        let elapsed = Date().timeIntervalSince(started)
                        box.record(answer == payload ? nil : "client \(i): wrong answer", elapsed)
                    } catch {
                        box.record("client \(i): \(error)", 0)
                    }
                    i += concurrency
                }
                group.leave()
            }.start()
        }
        group.wait()
        return box.result
    }

    final class ResultBox: @unchecked Sendable {
        private let lock = NSLock()
        private var stored = Result(latencies: [], failures: [])
        var result: Result { lock.withLock { stored } }
        func record(_ failure: String?, _ latency: TimeInterval) {
            lock.withLock {
                if let failure { stored.failures.append(failure) } else { stored.latencies.append(latency) }
            }
        }
    }
}

struct FastRandomBytes {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
    }
}
