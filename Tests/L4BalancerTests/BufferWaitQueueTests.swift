import L4Balancer
import XCTest

/// The queue of directions waiting for a buffer: never loses or repeats an entry, whatever
/// order entries are pushed, removed (their connection closed) and pushed again (the slot
/// reused).
final class BufferWaitQueueTests: XCTestCase {
    func testEntriesComeOutOnceInArrivalOrderFirstQueueFirst() {
        var queue = BufferWaitQueue(slots: 8)
        defer { queue.deallocate() }
        queue.push(BufferWaitQueue.entry(slot: 3, toUpstream: true), priority: .later)
        queue.push(BufferWaitQueue.entry(slot: 1, toUpstream: true), priority: .first)
        queue.push(BufferWaitQueue.entry(slot: 1, toUpstream: true), priority: .first)  // already queued
        queue.push(BufferWaitQueue.entry(slot: 2, toUpstream: false), priority: .first)
        XCTAssertEqual(queue.count, 3)
        var order: [UInt32] = []
        while let entry = queue.pop() { order.append(entry) }
        XCTAssertEqual(order, [2, 5, 6])  // slot 1 up, slot 2 down (first), slot 3 up (later)
        XCTAssertEqual(queue.count, 0)
        XCTAssertNil(queue.pop())
    }

    func testRemovingAClosedSlotAndReusingItLeavesNoStaleEntry() {
        var queue = BufferWaitQueue(slots: 4)
        defer { queue.deallocate() }
        let a = BufferWaitQueue.entry(slot: 0, toUpstream: true)
        let b = BufferWaitQueue.entry(slot: 1, toUpstream: true)
        let c = BufferWaitQueue.entry(slot: 2, toUpstream: false)
        queue.push(a, priority: .first)
        queue.push(b, priority: .first)
        queue.push(c, priority: .first)
        queue.remove(b)  // slot 1 closed
        queue.remove(b)  // twice is harmless
        queue.push(b, priority: .later)  // slot 1 reused, waits again
        XCTAssertEqual(queue.count, 3)
        XCTAssertEqual(queue.pop(), a)
        XCTAssertEqual(queue.pop(), c)
        XCTAssertEqual(queue.pop(), b)
        XCTAssertNil(queue.pop())
    }

    /// Random pushes, removals and pops against a model: every slot of a full table waits
    /// at once, so the queue is exactly at capacity, and nothing is lost or duplicated.
    func testMatchesAModelUnderRandomUseAtFullCapacity() {
        let slots = 512
        var queue = BufferWaitQueue(slots: slots)
        defer { queue.deallocate() }
        var model: [[UInt32]] = [[], []]
        var random = FastRandom(seed: 42)
        for _ in 0..<200_000 {
            let entry = UInt32(random.next(below: 2 * slots))
            switch random.next(below: 3) {
            case 0:
                let priority: BufferWaitQueue.Priority = random.next(below: 2) == 0 ? .first : .later
                if !model[0].contains(entry), !model[1].contains(entry) { model[Int(priority.rawValue)].append(entry) }
                queue.push(entry, priority: priority)
            case 1:
                model[0].removeAll { $0 == entry }
                model[1].removeAll { $0 == entry }
                queue.remove(entry)
            default:
                let expected = model[0].isEmpty ? model[1].first : model[0].first
                if let expected { model[model[0].isEmpty ? 1 : 0].removeFirst() }
                XCTAssertEqual(queue.pop(), expected)
            }
            XCTAssertEqual(queue.count, model[0].count + model[1].count)
        }
        for entry in 0..<UInt32(2 * slots) { queue.push(entry, priority: .first) }
        XCTAssertEqual(queue.count, 2 * slots)
        var seen = Set<UInt32>()
        while let entry = queue.pop() { XCTAssertTrue(seen.insert(entry).inserted) }
        XCTAssertEqual(seen.count, 2 * slots)
    }
}
