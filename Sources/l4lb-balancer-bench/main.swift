import CMallocCounter
import L4Balancer

#if canImport(Glibc)
import Glibc
#endif

// ns per pick and allocations per pick for every balancer with 10 and 1,000 endpoints,
// and the Maglev table build time. `--quick` for a short run (the test suite uses it).

let quick = CommandLine.arguments.contains("--quick")
let picks = quick ? 200_000 : 5_000_000

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) * 1e9 + Double(ts.tv_nsec)
}

func plan(_ balancer: Config.Cluster.Balancer, endpoints count: Int) -> Snapshot.ClusterPlan {
    var cluster = Config.Cluster(name: "bench", endpoints: (0..<count).map { i in
        Config.Endpoint(address: SocketAddress(ip: [10, 1, UInt8(i / 250), UInt8(i % 250 + 1)], port: 443), weight: i % 4 + 1)
    })
    cluster.balancer = balancer
    if balancer == .ringHash { cluster.hashBalanceFactor = 150 }
    var config = Config()
    config.clusters = [cluster]
    return Snapshot(config: config).clusters[0]
}

print("balancer        endpoints   ns/pick   allocations/pick")
for balancer in Config.Cluster.Balancer.allCases {
    for count in [10, 1000] {
        let picker = ClusterBalancer(cluster: plan(balancer, endpoints: count), seed: 42)
        let active = UnsafeMutablePointer<Int32>.allocate(capacity: count)
        active.initialize(repeating: 0, count: count)
        var key: UInt64 = 0x1234_5678
        var sink = 0
        var clusterActive = 0
        func run(_ n: Int) {
            for _ in 0..<n {
                key = StableHash.mix(key)
                let chosen = picker.pick(flowHash: key, tried: 0, active: ActiveCounts(active), clusterActive: clusterActive)!
                // Keep counts moving like a live worker would (bounded so they stay small).
                if active[chosen] < 64 {
                    active[chosen] += 1
                    clusterActive += 1
                } else {
                    active[chosen] = 0
                    clusterActive -= 64
                }
                sink &+= chosen
            }
        }
        run(10_000)
        let allocationsBefore = CMallocCounter_allocations()
        let start = now()
        run(picks)
        let elapsed = now() - start
        let allocations = CMallocCounter_allocations() - allocationsBefore
        let name = balancer.rawValue.padding(toLength: 15, withPad: " ", startingAt: 0)
        print("\(name) \(String(count).leftPad(9)) \(String(format1(elapsed / Double(picks))).leftPad(9))   \(Double(allocations) / Double(picks))")
        if sink == 42 { print("") }
        active.deallocate()
    }
}

let members = (0..<1000).map { i in (address: SocketAddress(ip: [10, 2, UInt8(i / 250), UInt8(i % 250 + 1)], port: 443), weight: 1) }
let buildStart = now()
let table = MaglevTable(endpoints: members, size: MaglevTable.defaultSize)
print("maglev table build, 1000 endpoints x \(table.size) slots: \(format1((now() - buildStart) / 1e6)) ms")

func format1(_ value: Double) -> String {
    let scaled = (value * 10).rounded() / 10
    return "\(scaled)"
}

extension String {
    func leftPad(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
