import Foundation
import XCTest

/// The balancer micro-benchmark allocates nothing per pick (it counts every malloc in its
/// process). Its timings are printed, never asserted.
final class BalancerBenchmarkTests: XCTestCase {
    func testEveryBalancerPicksWithoutAllocating() throws {
        let binary = URL(fileURLWithPath: L4LBProcess.binary).deletingLastPathComponent().appendingPathComponent("l4lb-balancer-bench").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--quick"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)
        print(output)
        let rows = output.split(separator: "\n").filter { !$0.hasPrefix("maglev table build") && ($0.contains(" 10 ") || $0.contains(" 1000 ")) }
        XCTAssertEqual(rows.count, 10, output)
        for row in rows {
            XCTAssertEqual(row.split(separator: " ").last, "0.0", "allocations per pick: \(row)")
        }
    }
}
