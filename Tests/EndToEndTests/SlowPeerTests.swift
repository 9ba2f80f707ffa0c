import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Slow is not idle, and a peer that reads nothing is not slow: `idle_timeout` counts
/// progress either way, `send_timeout` closes a peer that accepts nothing. And both orders
/// of half-close reach the other side with the other direction still flowing.
final class SlowPeerTests: XCTestCase {
    override class func setUp() {
        Sockets.raiseFileLimit()
        signal(SIGPIPE, SIG_IGN)
    }

    /// A 64 MiB download read at 1 MiB/s takes 64 s, far past `idle_timeout: 5s`, and is
    /// never idle-closed: every byte arrives, in order. Beside it a client that reads
    /// nothing is closed by `send_timeout: 2s` and counted.
    func testASlowReaderIsNotIdleAndAReaderOfNothingHitsTheSendTimeout() throws {
        let size = 64 << 20
        let backend = try TestBackend(.stream(bytes: size, seed: 5))
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: proxyConfig(
                listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1,
                listenerExtra: ["idle_timeout: 5s", "send_timeout: 2s"]),
            waitFor: ("127.0.0.1", port))

        let stalled = try Sockets.connect(port: port, receiveBuffer: 4096)
        defer { close(stalled) }
        let reader = try Sockets.connect(port: port, receiveBuffer: 65536)
        Sockets.setTimeout(reader, seconds: 10)

        // 1 MiB/s: 64 KiB reads, each at its slot on a 1/16 s clock.
        var pattern = PatternStream(seed: 5)
        var buffer = [UInt8](repeating: 0, count: 65536)
        var received = 0
        var intact = true
        let started = Date()
        while received < size {
            let slot = started.addingTimeInterval(Double(received) / Double(1 << 20))
            let wait = slot.timeIntervalSinceNow
            if wait > 0 { usleep(UInt32(wait * 1_000_000)) }
            let n = recv(reader, &buffer, min(buffer.count, size - received), 0)
            guard n > 0 else {
                XCTFail("the slow reader lost its connection after \(received) bytes, \(Date().timeIntervalSince(started)) s (n = \(n), errno \(errno))")
                break
            }
            intact = intact && buffer[..<n].withUnsafeBytes { pattern.matches($0) }
            received += n
            if received == size / 32 {
                // By now (2 s in) the reader of nothing has been closed.
                XCTAssertTrue(waitUntil(timeout: 5) { Sockets.isClosedByPeer(stalled) }, "the stalled reader is still open")
            }
        }
        XCTAssertEqual(received, size)
        XCTAssertTrue(intact, "the slow download arrived corrupted")
        XCTAssertEqual(recv(reader, &buffer, 1, 0), 0, "no EOF after the download")
        print("\(size >> 20) MiB read at 1 MiB/s in \(Int(Date().timeIntervalSince(started))) s")
        // The reader closes its side too (before l4lb stops: a half-open connection left
        // past idle_timeout would rightly be idle-closed during the drain).
        close(reader)

        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertEqual(summaryCounter(log, listener: "test", "idle_timeouts"), 0, "the slow reader was idle-closed: \(log)")
        XCTAssertEqual(summaryCounter(log, listener: "test", "send_timeouts"), 1, log)
    }

    /// Upstream-first FIN: the backend sends 4 MiB and half-closes; the client gets every
    /// byte and then EOF, and afterwards uploads 8 MiB that the backend receives intact
    /// before the client's own FIN closes the connection.
    func testUpstreamFirstHalfCloseKeepsTheClientDirectionFlowing() throws {
        let download = 4 << 20
        let upload = 8 << 20
        let backend = try TestBackend(.halfCloseFirst(bytes: download, seed: 11))
        let port = Sockets.freePort()
        let proxy = try L4LBProcess(
            config: proxyConfig(listen: "127.0.0.1:\(port)", endpoints: [backend.address], workers: 1),
            waitFor: ("127.0.0.1", port))
        let fd = try Sockets.connect(port: port, timeout: 10)
        defer { close(fd) }
        let received = try Sockets.receiveAll(fd)  // to the upstream's FIN
        XCTAssertEqual(received.count, download)
        var expected = PatternStream(seed: 11)
        XCTAssertTrue(received.withUnsafeBytes { expected.matches($0) }, "the download arrived corrupted")

        var source = PatternStream(seed: 12)
        var chunk = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<(upload / chunk.count) {
            chunk.withUnsafeMutableBytes { source.fill($0) }
            try Sockets.sendAll(fd, chunk)
        }
        shutdown(fd, Int32(SHUT_WR))
        XCTAssertTrue(waitUntil(timeout: 20) { backend.sinkBytes == upload && backend.closed >= 2 },
                      "the backend received \(backend.sinkBytes) of \(upload) bytes after its own FIN")
        XCTAssertFalse(backend.sinkMismatch, "the upload arrived corrupted")
        XCTAssertNotNil(Sockets.waitForClose(fd, timeout: 5), "l4lb did not close after both FINs")
        let (status, log) = proxy.stopAndCollectLog()
        XCTAssertEqual(status, 0)
        XCTAssertEqual(summaryCounter(log, listener: "test", "bytes_in"), upload, log)
        // And the readiness probe's share of its download.
        XCTAssertGreaterThanOrEqual(summaryCounter(log, listener: "test", "bytes_out") ?? 0, download, log)
    }
}
