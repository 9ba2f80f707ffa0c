import L4Balancer
import XCTest

final class SmoothRoundRobinTests: XCTestCase {
    func testInterleavesByWeightAsNginxDoes() {
        let rr = SmoothRoundRobin(weights: [5, 1, 1])
        let picks = (0..<7).map { _ in rr.pick()! }
        XCTAssertEqual(picks, [0, 0, 1, 0, 2, 0, 0])
    }

    func testWeightsAreHonouredExactlyOverACycle() {
        let rr = SmoothRoundRobin(weights: [3, 1])
        var counts = [0, 0]
        for _ in 0..<4000 { counts[rr.pick()!] += 1 }
        XCTAssertEqual(counts, [3000, 1000])
    }

    func testTriedEndpointsAndZeroWeightsAreSkipped() {
        let rr = SmoothRoundRobin(weights: [1, 0, 1])
        for _ in 0..<10 { XCTAssertEqual(rr.pick(tried: 0b001), 2) }
        XCTAssertNil(rr.pick(tried: 0b101))
    }
}
