import L4Balancer
import XCTest

/// Balancer distributions over many keys and picks. Shares are checked against weight
/// shares with an absolute tolerance (±2 percentage points).
final class BalancerTests: XCTestCase {
    func endpoints(_ count: Int, weights: [Int]? = nil) -> [(address: SocketAddress, weight: Int)] {
        var result: [(address: SocketAddress, weight: Int)] = []
        for i in 0..<count {
            let ip: [UInt8] = [10, 0, UInt8(i / 250), UInt8(i % 250 + 1)]
            result.append((SocketAddress(ip: ip, port: 8080), weights?[i] ?? 1))
        }
        return result
    }

    func plan(_ balancer: Config.Cluster.Balancer, weights: [Int], configure: (inout Config.Cluster) -> Void = { _ in }) throws -> Snapshot.ClusterPlan {
        var cluster = Config.Cluster(
            name: "c", endpoints: endpoints(weights.count, weights: weights).map { Config.Endpoint(address: $0.address, weight: $0.weight) })
        cluster.balancer = balancer
        configure(&cluster)
        var config = Config()
        config.clusters = [cluster]
        return Snapshot(config: config).clusters[0]
    }

    /// Random 32-bit client addresses, as flow hashes.
    func keys(_ count: Int, seed: UInt64 = 7) -> [UInt64] {
        var random = FastRandom(seed: seed)
        return (0..<count).map { _ in
            let ip = UInt32(truncatingIfNeeded: random.next())
            return StableHash.hash(withUnsafeBytes(of: ip.bigEndian) { Array($0) })
        }
    }

    // MARK: Maglev

    /// 300 endpoints, 290 of them down: every key still finds one of the 10 left (its probe
    /// sequence alone misses them for about one key in nine), and keys spread over them.
    func testMaglevNeverGivesUpWhileAnEndpointIsAvailable() {
        let table = MaglevTable(endpoints: endpoints(300))
        let up = Set(stride(from: 7, to: 300, by: 30))
        XCTAssertEqual(up.count, 10)
        var counts: [Int: Int] = [:]
        for key in keys(100_000) {
            guard let chosen = table.lookup(key, available: { up.contains($0) }) else { return XCTFail("key \(key) found no endpoint") }
            XCTAssertTrue(up.contains(chosen))
            counts[chosen, default: 0] += 1
        }
        XCTAssertEqual(counts.count, 10)
        XCTAssertGreaterThan(counts.values.min() ?? 0, 100_000 / 10 / 2, "\(counts)")
        XCTAssertNil(table.lookup(1, available: { _ in false }))
    }

    /// Endpoints 64 apart are different endpoints: trying 0 does not exclude 64.
    func testTriedEndpointsAreExactAbove64() throws {
        let rr = SmoothRoundRobin(weights: [Int](repeating: 1, count: 200))
        let others: [UInt16] = [64, 130, .max]
        try others.withUnsafeBufferPointer { list in
            let tried = TriedEndpoints(bits: 1, others: list.baseAddress, otherCount: 3)
            XCTAssertTrue(tried.contains(0))
            XCTAssertTrue(tried.contains(64))
            XCTAssertTrue(tried.contains(130))
            XCTAssertFalse(tried.contains(128))
            XCTAssertFalse(tried.contains(1))
            var seen = Set<Int>()
            for _ in 0..<400 { seen.insert(try XCTUnwrap(rr.pick(tried: tried))) }
            XCTAssertEqual(seen.count, 197)
            XCTAssertTrue(seen.isDisjoint(with: [0, 64, 130]))
        }
    }

    func testMaglevSpreadsSlotsEvenly() {
        let table = MaglevTable(endpoints: endpoints(10))
        var owned = [Int](repeating: 0, count: 10)
        for slot in table.slots { owned[Int(slot)] += 1 }
        let average = Double(table.size) / 10
        for (i, count) in owned.enumerated() {
            XCTAssertGreaterThanOrEqual(Double(count), 0.99 * average, "endpoint \(i) owns \(count)")
            XCTAssertLessThanOrEqual(Double(count), 1.01 * average, "endpoint \(i) owns \(count)")
        }
    }

    func testMaglevRemovalMovesOnlyTheRemovedEndpointsKeysAndAtMostTwoPercentOfOthers() {
        let all = endpoints(10)
        let before = MaglevTable(endpoints: all)
        let removed = 3
        let after = MaglevTable(endpoints: all.enumerated().filter { $0.offset != removed }.map(\.element))
        // `after` indexes the 9 remaining endpoints; map back to the original indices.
        let remaining = all.indices.filter { $0 != removed }
        func original(_ i: Int32) -> Int { remaining[Int(i)] }

        var otherSlots = 0
        var otherMoved = 0
        for slot in 0..<before.size where before.slots[slot] != Int32(removed) {
            otherSlots += 1
            if original(after.slots[slot]) != Int(before.slots[slot]) { otherMoved += 1 }
        }
        let slotShare = Double(otherMoved) / Double(otherSlots)
        XCTAssertLessThanOrEqual(slotShare, 0.02, "\(otherMoved) of \(otherSlots) slots of other endpoints moved")

        var otherKeys = 0
        var keysMoved = 0
        for key in keys(1_000_000) {
            let was = before.lookup(key) { _ in true }!
            guard was != removed else { continue }
            otherKeys += 1
            if original(Int32(after.lookup(key) { _ in true }!)) != was { keysMoved += 1 }
        }
        XCTAssertLessThanOrEqual(Double(keysMoved) / Double(otherKeys), 0.02, "\(keysMoved) of \(otherKeys) keys moved")
        print("maglev removal: \(otherMoved)/\(otherSlots) slots (\(String(format: "%.3f", slotShare * 100))%), \(keysMoved)/\(otherKeys) keys of other endpoints moved")
    }

    func testMaglevTableDoesNotDependOnConfigOrder() {
        let listed = endpoints(50, weights: (0..<50).map { $0 % 3 + 1 })
        let a = MaglevTable(endpoints: listed, size: 65537)
        let shuffled = Array(listed.reversed())
        let b = MaglevTable(endpoints: shuffled, size: 65537)
        // Same address in every slot, whatever the config order.
        for slot in 0..<a.size {
            XCTAssertEqual(listed[Int(a.slots[slot])].address, shuffled[Int(b.slots[slot])].address)
            if listed[Int(a.slots[slot])].address != shuffled[Int(b.slots[slot])].address { break }
        }
    }

    func testUnavailableSlotWalksTheKeysOwnProbeSequence() {
        let table = MaglevTable(endpoints: endpoints(5))
        for key in keys(1000) {
            let first = table.lookup(key) { _ in true }!
            let second = table.lookup(key) { $0 != first }!
            XCTAssertNotEqual(second, first)
            XCTAssertEqual(table.lookup(key) { $0 != first }, second, "deterministic")
        }
    }

    // MARK: Weighted shares, 1:2:3:4 over 1M

    func assertShares(_ counts: [Int], weights: [Int], _ name: String, file: StaticString = #filePath, line: UInt = #line) {
        let total = Double(counts.reduce(0, +))
        let weightTotal = Double(weights.reduce(0, +))
        var report: [String] = []
        for i in counts.indices {
            let share = Double(counts[i]) / total
            let expected = Double(weights[i]) / weightTotal
            report.append(String(format: "%.4f/%.2f", share, expected))
            XCTAssertEqual(share, expected, accuracy: 0.02, "\(name) endpoint \(i)", file: file, line: line)
        }
        print("\(name) shares (got/expected): \(report.joined(separator: " "))")
    }

    /// A cluster with no endpoints at all (a dns: cluster before its first answer, or past
    /// its hold): every balancer, weights equal or not, picks nothing — and does not trap.
    func testEveryBalancerPicksNothingFromAnEmptyCluster() throws {
        let active = [Int32](repeating: 0, count: 1)
        for balancer in Config.Cluster.Balancer.allCases {
            let picker = ClusterBalancer(cluster: try plan(balancer, weights: []), seed: 1)
            active.withUnsafeBufferPointer { a in
                for key in keys(100) {
                    XCTAssertNil(picker.pick(flowHash: key, tried: 0, active: ActiveCounts(a.baseAddress!), clusterActive: 0, endpoints: .allAvailable),
                                 balancer.rawValue)
                }
            }
        }
    }

    func testWeightedSharesForEveryBalancer() throws {
        let weights = [1, 2, 3, 4]
        let active = [Int32](repeating: 0, count: 4)
        let flows = keys(1_000_000)
        for balancer in [Config.Cluster.Balancer.maglev, .ringHash, .random, .roundRobin] {
            let picker = ClusterBalancer(cluster: try plan(balancer, weights: weights), seed: 1)
            var counts = [0, 0, 0, 0]
            active.withUnsafeBufferPointer { a in
                for key in flows {
                    counts[picker.pick(flowHash: key, tried: 0, active: ActiveCounts(a.baseAddress!), clusterActive: 0, endpoints: .allAvailable)!] += 1
                }
            }
            assertShares(counts, weights: weights, balancer.rawValue)
        }
    }

    // MARK: Bounded load

    func testRingHashBoundedLoadCapsEveryEndpoint() throws {
        let picker = RingHashPicker(cluster: try plan(.ringHash, weights: [1, 1, 1, 1, 1]) { $0.hashBalanceFactor = 125 })
        var active = [Int32](repeating: 0, count: 5)
        // Skewed: 80% of 1,000 long-lived connections come from 3 client addresses.
        let hot = keys(3, seed: 99)
        let cold = keys(200, seed: 5)
        var total = 0
        for i in 0..<1000 {
            let key = i % 5 == 4 ? cold[i % 200] : hot[i % 3]
            let chosen = active.withUnsafeBufferPointer { picker.pick(flowHash: key, tried: 0, active: ActiveCounts($0.baseAddress!), clusterActive: total, endpoints: .allAvailable)! }
            active[chosen] += 1
            total += 1
        }
        let cap = Int32((1.25 * 1000 / 5).rounded(.up))
        XCTAssertLessThanOrEqual(active.max()!, cap, "\(active)")
        print("ring_hash bounded load 125: \(active), cap \(cap)")

        // Without the bound, the hot keys pile up.
        let unbounded = RingHashPicker(cluster: try plan(.ringHash, weights: [1, 1, 1, 1, 1]))
        var counts = [Int32](repeating: 0, count: 5)
        for i in 0..<1000 {
            let key = i % 5 == 4 ? cold[i % 200] : hot[i % 3]
            counts[counts.withUnsafeBufferPointer { unbounded.pick(flowHash: key, tried: 0, active: ActiveCounts($0.baseAddress!), clusterActive: 0, endpoints: .allAvailable)! }] += 1
        }
        XCTAssertGreaterThan(counts.max()!, cap, "the skewed keys should overload some endpoint when unbounded: \(counts)")
    }

    func testLeastRequestPrefersTheLessLoaded() throws {
        let picker = LeastRequest(cluster: try plan(.leastRequest, weights: [1, 1, 1]), seed: 3)
        let active: [Int32] = [10, 0, 10]
        var counts = [0, 0, 0]
        active.withUnsafeBufferPointer { a in
            for _ in 0..<10_000 { counts[picker.pick(tried: 0, active: ActiveCounts(a.baseAddress!), endpoints: .allAvailable)!] += 1 }
        }
        // With two choices the idle endpoint wins whenever it is sampled: ~5/9 of picks.
        XCTAssertGreaterThan(counts[1], 5000, "\(counts)")
    }
}
