import COpenSSL
import XCTest

/// The byte queue both TLS BIOs keep their bytes in (`byte_queue.h`): whatever mix of
/// appends and takes, and however it moves or grows its buffer, bytes come out once, in
/// order, unchanged; and a buffer grown for a burst is given back once it empties.
final class TLSByteQueueTests: XCTestCase {
    func testRandomAppendsAndTakesComeOutInOrderUnchanged() {
        var queue = COpenSSL_Bytes()
        defer { COpenSSL_bytes_clear(&queue); XCTAssertEqual(COpenSSL_bytes_release(&queue), 1) }
        var generator = SystemRandomNumberGenerator()
        var expected: [UInt8] = []
        var expectedStart = 0
        var out = [UInt8](repeating: 0, count: 70_000)
        var nextByte: UInt8 = 0
        for _ in 0..<20_000 {
            if Bool.random(using: &generator) {
                // Sizes from a TLS header (5 bytes) to past a large record.
                let count = [1, 5, 300, 4_096, 16_406, 40_000].randomElement(using: &generator)!
                let bytes = (0..<count).map { _ -> UInt8 in nextByte &+= 1; return nextByte }
                XCTAssertEqual(COpenSSL_bytes_append(&queue, bytes, count, COpenSSL_output_burst_capacity), 1)
                expected += bytes
            } else {
                let want = Int.random(in: 0...out.count, using: &generator)
                let got = COpenSSL_bytes_take(&queue, &out, want)
                XCTAssertEqual(got, min(want, expected.count - expectedStart))
                XCTAssertEqual(Array(out[0..<got]), Array(expected[expectedStart..<(expectedStart + got)]))
                expectedStart += got
                if expectedStart == expected.count {
                    expected.removeAll(keepingCapacity: true)
                    expectedStart = 0
                }
            }
            XCTAssertEqual(COpenSSL_bytes_pending(&queue), expected.count - expectedStart)
        }
    }

    func testAStreamGrowsTheOutputQueueOnceAndAnEmptyQueueGivesItBack() {
        var queue = COpenSSL_Bytes()
        let record = [UInt8](repeating: 0x17, count: 16_384 + 22)
        var out = [UInt8](repeating: 0, count: 16_384)
        // Keep-alive traffic: a small record keeps a small buffer, kept when it empties.
        XCTAssertEqual(COpenSSL_bytes_append(&queue, record, 200, COpenSSL_output_burst_capacity), 1)
        XCTAssertLessThanOrEqual(queue.capacity, COpenSSL_output_kept_capacity)
        XCTAssertEqual(COpenSSL_output_take(&queue, &out, out.count), 200)
        XCTAssertNotNil(queue.data)
        // A stream: up to the worker's high water (two records) plus one, in one buffer.
        for _ in 0..<3 {
            let before = queue.capacity
            XCTAssertEqual(COpenSSL_bytes_append(&queue, record, record.count, COpenSSL_output_burst_capacity), 1)
            if before > COpenSSL_output_kept_capacity { XCTAssertEqual(queue.capacity, before) }
        }
        XCTAssertEqual(queue.capacity, COpenSSL_output_burst_capacity)
        while COpenSSL_bytes_pending(&queue) > 0 { _ = COpenSSL_output_take(&queue, &out, out.count) }
        // Drained: the burst buffer is given back.
        XCTAssertNil(queue.data)
        XCTAssertEqual(queue.capacity, 0)
    }
}
