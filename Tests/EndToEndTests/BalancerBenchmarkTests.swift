import Foundation
import XCTest

/// The balancer micro-benchmark allocates nothing per pick (it counts every malloc in its
/// process). Its timings are printed, never asserted.
final class BalancerBenchmarkTests: XCTestCase {
    func testEveryBalancerPicksWithoutAllocating() throws {
        let binary = URL(fileURLWithPath: L4LBProcess.binary).deletingLastPathComponent().appendingPathComponent("l4lb-balancer-bench").path
        let (status, output) = try ChildProcess.run(binary, ["--quick"])
        XCTAssertEqual(status, 0, output)
        print(output)
        let rows = output.split(separator: "\n").filter { !$0.hasPrefix("maglev table build") && ($0.contains(" 10 ") || $0.contains(" 1000 ")) }
        XCTAssertEqual(rows.count, 10, output)
        for row in rows {
            XCTAssertEqual(row.split(separator: " ").last, "0.0", "allocations per pick: \(row)")
        }
    }
}
