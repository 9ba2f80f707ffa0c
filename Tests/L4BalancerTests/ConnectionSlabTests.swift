import L4Balancer
import XCTest

/// The slab hands out each slot once, reuses the most recently freed first, moves a
/// slot's generation on when it is released (so a late completion of the slot's earlier
/// connection is told apart), and refuses beyond its capacity.
final class ConnectionSlabTests: XCTestCase {
    func testSlotsAreUniqueUntilFullThenRefused() {
        var slab = ConnectionSlab(capacity: 1000)
        defer { slab.deallocate() }
        var seen = Set<UInt32>()
        for _ in 0..<1000 {
            guard let slot = slab.allocate() else { return XCTFail("refused below capacity") }
            XCTAssertTrue(seen.insert(slot).inserted, "slot \(slot) handed out twice")
        }
        XCTAssertNil(slab.allocate(), "a slot beyond capacity")
        XCTAssertEqual(slab.active, 1000)
        slab.release(417)
        XCTAssertEqual(slab.allocate(), 417, "a freed slot is handed out again")
        XCTAssertNil(slab.allocate())
    }

    func testReleaseMovesTheGenerationOnAndReuseIsMostRecentFirst() {
        var slab = ConnectionSlab(capacity: 16)
        defer { slab.deallocate() }
        let slots = (0..<8).map { _ in slab.allocate()! }
        let before = slots.map { slab.generation($0) }
        slab.release(slots[2])
        slab.release(slots[5])
        XCTAssertEqual(slab.active, 6)
        XCTAssertEqual(slab.generation(slots[2]), before[2] + 1)
        XCTAssertEqual(slab.generation(slots[5]), before[5] + 1)
        XCTAssertEqual(slab.generation(slots[3]), before[3], "a slot not released keeps its generation")
        // Last freed, first reused: its memory is the warmest.
        XCTAssertEqual(slab.allocate(), slots[5])
        XCTAssertEqual(slab.allocate(), slots[2])
        // Fresh slots come from the high-water mark only once the free list is empty.
        XCTAssertEqual(slab.highWater, 8)
        XCTAssertEqual(slab.allocate(), 8)
        XCTAssertEqual(slab.highWater, 9)
    }

    /// The generation travels in 24 bits of user data: it wraps there, never colliding
    /// with the previous one.
    func testGenerationWrapsWithinTwentyFourBits() {
        var slab = ConnectionSlab(capacity: 1)
        defer { slab.deallocate() }
        var previous = slab.generation(slab.allocate()!)
        for _ in 0..<(1 << 24) + 3 {
            slab.release(0)
            let slot = slab.allocate()!
            let generation = slab.generation(slot)
            XCTAssertLessThan(generation, 1 << 24)
            if generation == previous { return XCTFail("generation repeated at \(generation)") }
            previous = generation
        }
    }
}
