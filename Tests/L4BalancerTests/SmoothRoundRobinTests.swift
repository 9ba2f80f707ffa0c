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

final class DeadlineSchedulerTests: XCTestCase {
    func testSharesAreExactOverACycleAndTriedAreSkipped() {
        let scheduler = DeadlineScheduler(weights: (0..<100).map { $0 % 4 + 1 })
        var counts = [Int](repeating: 0, count: 100)
        // One cycle is Σw = 250 picks per unit of lcm; 6,000 picks = 24 cycles.
        for _ in 0..<6000 { counts[scheduler.pick()!] += 1 }
        for i in 0..<100 { XCTAssertEqual(counts[i], 24 * (i % 4 + 1), "endpoint \(i)") }
        for _ in 0..<100 { XCTAssertNotEqual(scheduler.pick(tried: TriedEndpoints(bits: 1 << 3)), 3) }
    }

    func testLargeRoundRobinClustersUseTheScheduler() throws {
        var cluster = Config.Cluster(name: "big", endpoints: (0..<100).map {
            Config.Endpoint(address: SocketAddress(ip: [10, 0, 0, UInt8($0 + 1)], port: 80))
        })
        cluster.balancer = .roundRobin
        var config = Config()
        config.clusters = [cluster]
        let picker = ClusterBalancer(cluster: Snapshot(config: config).clusters[0], seed: 0)
        guard case .deadlineRoundRobin = picker else { return XCTFail("expected the O(log n) schedule") }
        var seen = Set<Int>()
        let active = [Int32](repeating: 0, count: 100)
        active.withUnsafeBufferPointer { a in
            for _ in 0..<100 { seen.insert(picker.pick(flowHash: 0, tried: 0, active: ActiveCounts(a.baseAddress!), clusterActive: 0)!) }
        }
        XCTAssertEqual(seen.count, 100, "equal weights: each endpoint once per 100 picks")
    }
}
