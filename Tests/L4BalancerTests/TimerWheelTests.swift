import L4Balancer
import XCTest

/// The idle-timeout wheel: each slot comes due at the tick it was filed for (never
/// earlier than the next tick), exactly once; a removed or re-filed slot does not come
/// due under its old deadline; a deadline beyond the wheel's span comes due early in the
/// bucket of its low bits, for the owner to file again.
final class TimerWheelTests: XCTestCase {
    var slab = ConnectionSlab(capacity: 20_000)
    var wheel = TimerWheel(now: 0)

    override func tearDown() {
        slab.deallocate()
        wheel.deallocate()
    }

    /// Advances to `now`, returning each slot that came due with the tick it came due at.
    func advance(to now: UInt32) -> [UInt32: UInt32] {
        var due: [UInt32: UInt32] = [:]
        while let head = wheel.takeNextDueBucket(now: now) {
            var cursor = head
            while let slot = wheel.next(&cursor, in: slab) {
                XCTAssertNil(due[slot], "slot \(slot) came due twice")
                XCTAssertFalse(wheel.isFiled(slot, in: slab), "a due slot is still linked")
                due[slot] = wheel.processedTick
            }
        }
        return due
    }

    func testTenThousandSlotsComeDueAtTheirDeadlinesOnce() {
        var deadlines: [UInt32: UInt32] = [:]
        var random = SystemRandomNumberGenerator()
        for _ in 0..<10_000 {
            let slot = slab.allocate()!
            let deadline = UInt32.random(in: 1...3000, using: &random)
            wheel.insert(slot, deadline: deadline, in: slab)
            deadlines[slot] = deadline
        }
        var due: [UInt32: UInt32] = [:]
        // In uneven steps, as ticks arrive late under load.
        var now: UInt32 = 0
        while now < 3000 {
            now = min(3000, now + UInt32.random(in: 1...37, using: &random))
            for (slot, tick) in advance(to: now) {
                XCTAssertNil(due[slot], "slot \(slot) came due twice")
                due[slot] = tick
            }
        }
        XCTAssertEqual(due, deadlines)
    }

    func testRemovedAndRefiledSlotsFollowTheirNewDeadline() {
        let a = slab.allocate()!, b = slab.allocate()!, c = slab.allocate()!, d = slab.allocate()!
        for slot in [a, b, c, d] { wheel.insert(slot, deadline: 10, in: slab) }
        wheel.remove(b, in: slab)
        wheel.remove(b, in: slab)  // twice: nothing
        XCTAssertFalse(wheel.isFiled(b, in: slab))
        wheel.remove(c, in: slab)
        wheel.insert(c, deadline: 20, in: slab)
        // The head of the bucket removed: the list still holds the rest.
        wheel.remove(d, in: slab)
        XCTAssertEqual(advance(to: 15), [a: 10])
        XCTAssertEqual(advance(to: 25), [c: 20])
        XCTAssertEqual(advance(to: 5000), [:])
    }

    func testAPastDeadlineComesDueAtTheNextTick() {
        _ = advance(to: 100)
        let slot = slab.allocate()!
        wheel.insert(slot, deadline: 40, in: slab)
        XCTAssertEqual(advance(to: 100), [:], "nothing before the clock moves")
        XCTAssertEqual(advance(to: 101), [slot: 101])
    }

    func testADeadlineBeyondTheSpanComesDueEarlyForTheOwnerToRefile() {
        let slot = slab.allocate()!
        let far = UInt32(TimerWheel.bucketCount) + 50
        wheel.insert(slot, deadline: far, in: slab)
        XCTAssertEqual(advance(to: 60), [slot: 50], "due in the bucket of the deadline's low bits")
        wheel.insert(slot, deadline: far, in: slab)
        XCTAssertEqual(advance(to: far), [slot: far])
    }
}
