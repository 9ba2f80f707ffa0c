import Foundation
import L4Balancer
import XCTest

/// The table `rate_limit` shares between workers: GCRA buckets allow exactly the burst and
/// then one unit per interval; connection places never exceed the maximum, even with four
/// threads racing for them; a full probe window forgets the least recently due source
/// holding no connection, and lets a new source through untracked when every one there
/// holds a connection — it never refuses a client for being full.
final class SourceTableTests: XCTestCase {
    /// A key for 192.0.2.`host`/32 on listener 1.
    func key(_ host: UInt64) -> SourceKey {
        SourceKey(high: 0, low: 0xC000_0200 | host, meta: 1 << 16 | 4 << 8 | 32)
    }

    func testABucketAllowsItsBurstThenOneUnitPerInterval() throws {
        let table = SourceTable(capacity: 64)
        let now: UInt64 = 1_000_000_000
        let (slot, _) = try XCTUnwrap(table.slot(for: key(1), now: now))
        let interval: UInt64 = 10_000_000  // 100 a second
        let burst: UInt64 = 5
        // As `rate_limit` sets it: the burst's worth of intervals.
        let tolerance = burst * interval
        var allowed = 0
        for _ in 0..<20 where table.take(slot, .connectionTAT, interval: interval, tolerance: tolerance, now: now) { allowed += 1 }
        XCTAssertEqual(allowed, Int(burst), "the burst at one instant")
        XCTAssertFalse(table.take(slot, .connectionTAT, interval: interval, tolerance: tolerance, now: now + interval - 1))
        XCTAssertTrue(table.take(slot, .connectionTAT, interval: interval, tolerance: tolerance, now: now + interval))
        XCTAssertFalse(table.take(slot, .connectionTAT, interval: interval, tolerance: tolerance, now: now + interval))
        // The other bucket of the same source is its own.
        XCTAssertTrue(table.take(slot, .packetTAT, interval: interval, tolerance: tolerance, now: now))
        // Idle long enough, the whole burst is back, never more.
        allowed = 0
        for _ in 0..<20 where table.take(slot, .connectionTAT, interval: interval, tolerance: tolerance, now: now + 1_000 * interval) { allowed += 1 }
        XCTAssertEqual(allowed, Int(burst))
    }

    func testTheSameSourceFindsItsSlotAndOthersGetTheirOwn() throws {
        let table = SourceTable(capacity: 1024)
        let now = SourceTable.now()
        var slots: [Int: UInt64] = [:]
        for host in 1...200 as ClosedRange<UInt64> {
            let (slot, _) = try XCTUnwrap(table.slot(for: key(host), now: now))
            XCTAssertNil(slots[slot], "two sources in slot \(slot)")
            slots[slot] = host
            // A place held, so no later source may take the slot over.
            XCTAssertTrue(table.enter(slot, tag: try XCTUnwrap(table.slot(for: key(host), now: now)).tag, maximum: 10))
        }
        for host in 1...200 as ClosedRange<UInt64> {
            XCTAssertEqual(slots[try XCTUnwrap(table.slot(for: key(host), now: now)).slot], host)
        }
        XCTAssertEqual(table.count(.tracked), 200)
    }

    func testFourThreadsNeverTakeMorePlacesThanTheMaximum() throws {
        let table = SourceTable(capacity: 64)
        let (slot, tag) = try XCTUnwrap(table.slot(for: key(7), now: SourceTable.now()))
        let maximum = 1500
        let taken = ManagedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for _ in 0..<1000 where table.enter(slot, tag: tag, maximum: maximum) { taken.add(1) }
        }
        XCTAssertEqual(taken.value, maximum)
        // Every place given back: the source can take the maximum again.
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for _ in 0..<maximum / 4 { table.leave(slot) }
        }
        var again = 0
        for _ in 0..<2000 where table.enter(slot, tag: tag, maximum: maximum) { again += 1 }
        XCTAssertEqual(again, maximum)
    }

    /// Capacity 8 is one probe window: every source lands in it.
    func testAFullWindowEvictsTheLeastRecentlyDueOrGoesUntracked() throws {
        let table = SourceTable(capacity: 8)
        let now: UInt64 = 10_000_000_000
        let interval: UInt64 = 1_000_000_000
        var slots: [UInt64: Int] = [:]
        for host in 1...8 as ClosedRange<UInt64> {
            let (slot, _) = try XCTUnwrap(table.slot(for: key(host), now: now))
            slots[host] = slot
            // Each source took a unit, later sources later: host 1 is due first.
            XCTAssertTrue(table.take(slot, .connectionTAT, interval: interval, tolerance: interval, now: now + host))
        }
        XCTAssertEqual(table.count(.tracked), 8)
        // A ninth source: the least recently due (host 1) is forgotten for it.
        let (ninth, _) = try XCTUnwrap(table.slot(for: key(9), now: now + 100))
        XCTAssertEqual(ninth, slots[1])
        XCTAssertEqual(table.count(.evictions), 1)
        XCTAssertTrue(table.take(ninth, .connectionTAT, interval: interval, tolerance: interval, now: now + 100))
        // Host 1 comes back as a new source, with a full bucket: it evicts host 2.
        let (back, _) = try XCTUnwrap(table.slot(for: key(1), now: now + 200))
        XCTAssertEqual(back, slots[2])
        XCTAssertEqual(table.count(.evictions), 2)
        XCTAssertTrue(table.take(back, .connectionTAT, interval: interval, tolerance: interval, now: now + 200))

        // Every source in the window holding a connection: a new one goes untracked.
        let full = SourceTable(capacity: 8)
        for host in 1...8 as ClosedRange<UInt64> {
            let (slot, tag) = try XCTUnwrap(full.slot(for: key(host), now: now))
            XCTAssertTrue(full.enter(slot, tag: tag, maximum: 1))
        }
        XCTAssertNil(full.slot(for: key(9), now: now), "no source holding a connection is forgotten")
        XCTAssertEqual(full.count(.untracked), 1)
        XCTAssertEqual(full.count(.evictions), 0)
        // One connection closes: that slot, now forgettable, goes to the new source.
        let (first, _) = try XCTUnwrap(full.slot(for: key(1), now: now))
        full.leave(first)
        XCTAssertEqual(try XCTUnwrap(full.slot(for: key(9), now: now)).slot, first)
    }
}

/// A counter for threads in a test (a lock is fine here, off the data path).
final class ManagedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    var value: Int { lock.withLock { count } }
    func add(_ n: Int) { lock.withLock { count += n } }
}
