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

    /// Out of file descriptors (EMFILE on accept and on the upstream socket): clients
    /// beyond the limit are not served, l4lb keeps running, counts it, and serves new
    /// clients again once descriptors are free.
    func testRunningOutOfFileDescriptorsDegradesAndRecovers() throws {
        let backend = try TestBackend(.echo)
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1), waitFor: ("127.0.0.1", port))
        let squeeze = try ChildProcess.run("/usr/bin/prlimit", ["--pid", "\(proxy.pid)", "--nofile=64:64"])
        XCTAssertEqual(squeeze.status, 0, squeeze.output)

        func exchange(_ fd: Int32) -> Bool {
            Sockets.setTimeout(fd, seconds: 0.3)
            guard (try? Sockets.sendAll(fd, Array("ping".utf8))) != nil else { return false }
            return (try? Sockets.receiveExactly(fd, 4)) == Array("ping".utf8)
        }
        var held: [Int32] = []
        var served = 0
        var unserved = 0
        for _ in 0..<40 {
            guard let fd = try? Sockets.connect(port: port, timeout: 1) else {
                unserved += 1
                continue
            }
            held.append(fd)
            if exchange(fd) { served += 1 } else { unserved += 1 }
        }
        print("with 64 descriptors: \(served) clients served, \(unserved) not")
        XCTAssertGreaterThan(served, 5)
        XCTAssertGreaterThan(unserved, 0, "the limit was never reached")
        XCTAssertTrue(proxy.process.isRunning, "l4lb died when it ran out of descriptors")

        held.forEach { close($0) }
        let recovered = waitUntil(timeout: 5) {
            guard let fd = try? Sockets.connect(port: port, timeout: 1) else { return false }
            defer { close(fd) }
            return exchange(fd)
        }
        XCTAssertTrue(recovered, "l4lb did not serve again after descriptors were freed")
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        let errors = (summaryCounter(log, listener: "test", "accept_errors") ?? 0) + (summaryCounter(log, listener: "test", "connect_failed") ?? 0)
        XCTAssertGreaterThan(errors, 0, "exhaustion was not counted: \(log)")
    }
}
