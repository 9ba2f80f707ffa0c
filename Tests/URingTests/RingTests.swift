import Foundation
import Glibc
import URing
import XCTest

/// The io_uring wrapper against the real kernel: these machines have io_uring, so nothing
/// here is skipped.
final class RingTests: XCTestCase {
    var completions = UnsafeMutableBufferPointer<Completion>.allocate(capacity: 64)

    deinit { completions.deallocate() }

    /// Waits for and returns the next completions.
    func next(_ ring: borrowing Ring, count: Int = 1) throws -> [Completion] {
        var result: [Completion] = []
        while result.count < count {
            try ring.submitAndWait(minimum: 1)
            let n = ring.reap(into: completions)
            result += completions[..<n]
        }
        return result
    }

    func socketPair() -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        return (fds[0], fds[1])
    }

    func testRingProbesTheFeaturesTheDataPlaneNeeds() throws {
        let ring = try Ring(entries: 64)
        XCTAssertTrue(ring.capabilities.multishotAccept, "\(ring.capabilities)")
        XCTAssertTrue(ring.capabilities.providedBufferRings)
        XCTAssertTrue(ring.capabilities.singleIssuer)
        XCTAssertTrue(ring.capabilities.deferTaskrun)
    }

    /// Batched wait: returns with the one completion there is once the window has passed
    /// (not after waiting for the whole batch), and without any, at the timeout.
    func testBatchedWaitReturnsAfterTheWindowWithWhatIsReady() throws {
        let ring = try Ring(entries: 8)
        XCTAssertTrue(ring.capabilities.batchWait, "Linux 6.12+ with DEFER_TASKRUN: \(ring.capabilities)")
        ring.prepareNop(userData: 7)
        var start = Date()
        try ring.submitAndWait(batch: 64, windowMicroseconds: 2_000, timeoutMilliseconds: 5_000)
        XCTAssertLessThan(Date().timeIntervalSince(start), 1, "waited for the batch, not the window")
        XCTAssertEqual(ring.reap(into: completions), 1)
        XCTAssertEqual(completions[0].userData, 7)
        start = Date()
        try ring.submitAndWait(batch: 64, windowMicroseconds: 2_000, timeoutMilliseconds: 200)
        let idle = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(idle, 0.15, "returned early with nothing ready")
        XCTAssertLessThan(idle, 2, "ignored the timeout")
        XCTAssertEqual(ring.reap(into: completions), 0)
    }

    func testNopCarriesUserData() throws {
        let ring = try Ring(entries: 8)
        ring.prepareNop(userData: 0xDEAD_BEEF_0000_0001)
        let c = try next(ring)
        XCTAssertEqual(c.first?.userData, 0xDEAD_BEEF_0000_0001)
        XCTAssertEqual(c.first?.result, 0)
    }

    func testFullSubmissionQueueIsSubmittedNotDropped() throws {
        let ring = try Ring(entries: 8)
        for i in 0..<40 { ring.prepareNop(userData: UInt64(i)) }
        let all = try next(ring, count: 40)
        XCTAssertEqual(Set(all.map(\.userData)), Set((0..<40).map(UInt64.init)))
    }

    func testTimeoutExpiresWithETIME() throws {
        let ring = try Ring(entries: 8)
        var timeout = Timeout(milliseconds: 20)
        let start = Date()
        ring.prepareTimeout(&timeout, userData: 7)
        let c = try next(ring)
        XCTAssertEqual(c.first?.error, .timerExpired)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.015)
    }

    func testReceiveUsesProvidedBufferAndRunsDryWithENOBUFS() throws {
        let ring = try Ring(entries: 16)
        var buffers = try ProvidedBufferRing(ring: ring, group: 3, count: 2, bufferSize: 4096)
        defer { buffers.unregister(from: ring) }
        let (a, b) = socketPair()
        defer { close(a); close(b) }

        // Two receives take both buffers.
        for i in 0..<2 {
            XCTAssertEqual(send(b, "msg\(i)", 4, 0), 4)
            ring.prepareReceive(socket: a, bufferGroup: 3, userData: UInt64(i))
            let c = try next(ring)[0]
            XCTAssertEqual(c.result, 4)
            let id = try XCTUnwrap(c.bufferID)
            buffers.handedOut()
            XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: buffers.address(of: id), count: 4), as: UTF8.self), "msg\(i)")
        }
        XCTAssertEqual(buffers.inUse, 2)
        // The ring is empty: ENOBUFS, and nothing is lost from the socket.
        XCTAssertEqual(send(b, "late", 4, 0), 4)
        ring.prepareReceive(socket: a, bufferGroup: 3, userData: 9)
        XCTAssertEqual(try next(ring)[0].error, .noBufferSpace)
        // Recycled and published, the same receive succeeds.
        buffers.recycle(0)
        XCTAssertEqual(buffers.publish(), 1)
        ring.prepareReceive(socket: a, bufferGroup: 3, userData: 10)
        let c = try next(ring)[0]
        XCTAssertEqual(c.result, 4)
        XCTAssertEqual(c.bufferID, 0)
    }

    /// The kernel sees at most `window` buffers; the rest wait in the pool, and the most
    /// recently returned buffer is the next one handed out (it is the warm one).
    func testBufferPoolKeepsAWindowInTheKernelAndReusesTheWarmestBuffer() throws {
        let ring = try Ring(entries: 16)
        var buffers = try ProvidedBufferRing(ring: ring, group: 4, count: 8, bufferSize: 1024, window: 2)
        defer { buffers.unregister(from: ring) }
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        func receive(_ text: String) throws -> Completion {
            XCTAssertEqual(send(b, text, text.utf8.count, 0), text.utf8.count)
            ring.prepareReceive(socket: a, bufferGroup: 4, userData: 1)
            let c = try next(ring)[0]
            if c.bufferID != nil { buffers.handedOut() }
            return c
        }
        let first = try XCTUnwrap(try receive("one").bufferID)
        let second = try XCTUnwrap(try receive("two").bufferID)
        // Two handed out, the window is empty although six are free.
        XCTAssertEqual(try receive("three").error, .noBufferSpace)
        XCTAssertEqual(buffers.available, 6)
        XCTAssertEqual(buffers.publish(), 2)
        let third = try XCTUnwrap(try receive("three").bufferID)
        XCTAssertFalse([first, second].contains(third))
        // Returned buffers go on top of the stack: after the window refills, the next
        // receives get the buffers just returned.
        buffers.recycle(first)
        buffers.recycle(second)
        XCTAssertEqual(buffers.inUse, 1)
        _ = try receive("four")
        buffers.publish()
        let fifth = try XCTUnwrap(try receive("five").bufferID)
        let sixth = try XCTUnwrap(try receive("six").bufferID)
        XCTAssertTrue([first, second].contains(fifth) || [first, second].contains(sixth), "\(fifth) \(sixth)")
    }

    /// A multishot receive with a total limit ends by itself once the limit is reached:
    /// the completion that reaches it has no `hasMore`, so one arm takes less than the
    /// limit plus one buffer, whatever the peer sends.
    func testMultishotReceiveWithALimitEndsByItself() throws {
        let ring = try Ring(entries: 16)
        try XCTSkipUnless(ring.capabilities.multishotReceiveLimit, "needs Linux 6.16 (this machine has it; the data plane falls back to single-shot receives)")
        var buffers = try ProvidedBufferRing(ring: ring, group: 5, count: 64, bufferSize: 4096)
        defer { buffers.unregister(from: ring) }
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        ring.prepareMultishotReceive(socket: a, bufferGroup: 5, limit: 4096, userData: 1)
        ring.submitPending()
        var total = 0
        var completions = 0
        var ended = false
        let chunk = [UInt8](repeating: 7, count: 1000)
        for _ in 0..<20 where !ended {
            XCTAssertEqual(send(b, chunk, chunk.count, 0), chunk.count)
            let c = try next(ring)[0]
            XCTAssertGreaterThan(c.result, 0)
            total += Int(c.result)
            completions += 1
            ended = !c.hasMore
        }
        XCTAssertTrue(ended, "the receive did not end at its limit")
        XCTAssertGreaterThanOrEqual(total, 4096)
        XCTAssertLessThan(total, 4096 + 4096)
        XCTAssertLessThanOrEqual(completions, 5)
    }

    func testMultishotAcceptDeliversEveryConnection() throws {
        let ring = try Ring(entries: 16)
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        XCTAssertEqual(listen(listener, 16), 0)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }

        ring.prepareMultishotAccept(listener: listener, userData: 1)
        ring.submitPending()
        var clients: [Int32] = []
        for _ in 0..<3 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
            clients.append(fd)
        }
        let accepted = try next(ring, count: 3)
        XCTAssertEqual(accepted.count, 3)
        for c in accepted {
            XCTAssertGreaterThan(c.result, 0)
            XCTAssertTrue(c.hasMore, "multishot accept should stay armed")
            close(c.result)
        }
        clients.forEach { close($0) }
    }

    func testConnectTimesOutThroughLinkedTimeout() throws {
        let ring = try Ring(entries: 16)
        // A listener with a full accept queue never answers further SYNs.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        listen(listener, 0)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        var fds = [listener]
        defer { fds.forEach { close($0) } }
        var timeout = Timeout(milliseconds: 200)
        var sawTimeout = false
        for attempt in 0..<6 where !sawTimeout {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            fds.append(fd)
            withUnsafePointer(to: &address) { a in
                a.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    ring.prepareConnect(socket: fd, address: $0, length: length, userData: UInt64(attempt), timeout: &timeout, timeoutUserData: 100)
                }
            }
            let both = try next(ring, count: 2)
            let connect = try XCTUnwrap(both.first { $0.userData == UInt64(attempt) })
            if connect.error == .canceled { sawTimeout = true }
        }
        XCTAssertTrue(sawTimeout, "no connect was cancelled by its linked timeout")
    }
}
