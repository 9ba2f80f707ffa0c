import BPFSteer
import L4Balancer
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The kernel forwarder's endpoint choice for a SYN (issue 35, step 4) against user
/// space's own: `FlowHash` and `MaglevTable.lookup`, with the same weights and the same
/// endpoints out, for every hash key and both families, and the NAT the new flow gets.
/// SYNs are run in the kernel on test packets (BPF_PROG_TEST_RUN) in a namespace with
/// routes to both sides; nothing is sent.
final class KernelSelectionTests: XCTestCase {
    typealias Frames = KernelRelayProgramTests
    static let syn: UInt8 = 0x02

    struct Cluster {
        var listener: String
        var nat: String
        var endpoints: [String]
        var weights: [Int]
        /// The kernel slot of each endpoint (deliberately not their positions).
        var slots: [UInt32]
        var clientPrefix: String
    }

    static let clusters = [
        Cluster(listener: "198.51.100.1", nat: "203.0.113.1",
                endpoints: (10...14).map { "203.0.113.\($0)" }, weights: [1, 2, 3, 0, 1], slots: [7, 3, 100, 5, 42], clientPrefix: "198.51.100."),
        Cluster(listener: "2001:db8:1::1", nat: "2001:db8:2::1",
                endpoints: (10...14).map { "2001:db8:2::\($0)" }, weights: [1, 2, 3, 0, 1], slots: [8, 9, 10, 11, 12], clientPrefix: "2001:db8:1::"),
    ]
    static let endpointPort: UInt16 = 8080
    static let natPorts = (first: UInt16(61000), count: 4536)

    /// 300 SYNs per case from clients all over the client network: every one lands where
    /// `MaglevTable.lookup` sends it, from the NAT address and a port in the range, and the
    /// flow's reply entry turns the endpoint's SYN-ACK back toward the client.
    func testSYNsPickTheEndpointUserSpaceWould() throws {
        let scratch = try RoutedScratchNamespace()
        let relay = try KernelRelay(capacity: 1 << 16)
        try relay.setNATPorts(first: Self.natPorts.first, count: Self.natPorts.count)
        var generator = SystemRandomNumberGenerator()
        var listener = 0
        var expectedFlows: UInt64 = 0
        var expectedNoEndpoint: UInt64 = 0
        for cluster in Self.clusters {
            let addresses = cluster.endpoints.map { SocketAddress(ip: Frames.ip($0), port: Self.endpointPort) }
            let table = MaglevTable(endpoints: zip(addresses, cluster.weights).map { (address: $0, weight: $1) }, size: 65537)
            for key in Config.Cluster.HashKey.allCases {
                listener += 1
                let port = UInt16(80 + listener)
                let hashKey: KernelRelayPlan.HashKey = switch key {
                case .sourceIP: .sourceIP
                case .sourceIPPort: .sourceIPPort
                case .fiveTuple: .fiveTuple
                }
                try relay.setService(address: Frames.ip(cluster.listener), port: port, listener: listener)
                try relay.setPlan(listener: listener, words: KernelRelayPlan.maglev(table: table.slots, slots: cluster.slots,
                                                                                    weights: cluster.weights, hashKey: hashKey))
                // All in; the heaviest out; all but the last out (the probe sequence rarely
                // finds it, then the scan does); none in.
                let cases: [[Bool]] = [[true, true, true, true, true], [true, true, false, true, true],
                                       [false, false, false, false, true], [false, false, false, false, false]]
                var clientPort: UInt16 = 1024  // each client tuple once: a second SYN would meet its flow
                for available in cases {
                    for (position, slot) in cluster.slots.enumerated() {
                        try relay.setEndpoint(slot: Int(slot), KernelRelay.Endpoint(address: Frames.ip(cluster.endpoints[position]),
                                                                                    port: Self.endpointPort, available: available[position]))
                    }
                    for _ in 0..<300 {
                        let client = Frames.Endpoint(ip: Frames.ip(cluster.clientPrefix + (cluster.clientPrefix.contains(":")
                                ? String(UInt16.random(in: 2...0xFFFE, using: &generator), radix: 16) : String(Int.random(in: 2...254, using: &generator)))),
                                                     port: clientPort)
                        clientPort += 1
                        let service = Frames.Endpoint(ip: Frames.ip(cluster.listener), port: port)
                        let hash = FlowHash.compute(client: client.ip, clientPort: client.port, listener: service.ip, listenerPort: port, key: key)
                        let expected = table.lookup(hash) { cluster.weights[$0] > 0 && available[$0] }
                        let frame = Frames.frame(.tcp, from: client, to: service, payload: [], tcpFlags: Self.syn)
                        let out = try scratch.run { try relay.run(frame) }
                        guard let expected else {
                            XCTAssertEqual(out.verdict, .next, "no endpoint available: the SYN is the stack's")
                            expectedNoEndpoint += 1
                            continue
                        }
                        guard out.verdict == .redirect else {
                            XCTFail("\(cluster.listener) \(key) \(available): verdict \(out.verdict)")
                            continue
                        }
                        expectedFlows += 1
                        let v4 = client.ip.count == 4
                        let length = v4 ? 4 : 16, sourceAt = v4 ? 26 : 22, l4 = v4 ? 34 : 54
                        let source = Array(out.packet[sourceAt..<(sourceAt + length)])
                        let destination = Array(out.packet[(sourceAt + length)..<(sourceAt + 2 * length)])
                        let natPort = UInt16(out.packet[l4]) << 8 | UInt16(out.packet[l4 + 1])
                        let endpointPort = UInt16(out.packet[l4 + 2]) << 8 | UInt16(out.packet[l4 + 3])
                        XCTAssertEqual(destination, Frames.ip(cluster.endpoints[expected]),
                                       "\(cluster.listener) \(key) \(available): kernel and user space disagree")
                        XCTAssertEqual(endpointPort, Self.endpointPort)
                        XCTAssertEqual(source, Frames.ip(cluster.nat), "the NAT address is the route's source toward the endpoint")
                        XCTAssertTrue((Int(Self.natPorts.first)..<(Int(Self.natPorts.first) + Self.natPorts.count)).contains(Int(natPort)))
                        // The endpoint's SYN-ACK to the NAT port goes back to the client, from the listener.
                        let endpoint = Frames.Endpoint(ip: destination, port: Self.endpointPort)
                        let reply = try scratch.run {
                            try relay.run(Frames.frame(.tcp, from: endpoint, to: Frames.Endpoint(ip: source, port: natPort), payload: [], tcpFlags: 0x12))
                        }
                        XCTAssertEqual(reply.verdict, .redirect)
                        XCTAssertEqual(Array(reply.packet[sourceAt..<(sourceAt + 2 * length)]), service.ip + client.ip)
                        XCTAssertEqual(Array(reply.packet[l4..<(l4 + 4)]), Frames.be16(Int(port)) + Frames.be16(Int(client.port)))
                    }
                }
            }
        }
        let totals = relay.totals()
        XCTAssertEqual(totals.newFlows, expectedFlows)
        XCTAssertEqual(totals.fallbackNoEndpoint, expectedNoEndpoint)
        XCTAssertEqual(totals.fallbackNoPort + totals.fallbackNoRoute + totals.fallbackTableFull + totals.droppedNoRoute, 0, "\(totals)")
    }

    /// Runs a SYN from `client`:`port` to `service` and returns the endpoint address it was
    /// sent to and its NAT port, or nil when it was left to the stack.
    func pick(_ relay: KernelRelay, in scratch: RoutedScratchNamespace, client: [UInt8], port: UInt16,
              service: Frames.Endpoint) throws -> (endpoint: [UInt8], natPort: UInt16)? {
        let frame = Frames.frame(.tcp, from: Frames.Endpoint(ip: client, port: port), to: service, payload: [], tcpFlags: Self.syn)
        let out = try scratch.run { try relay.run(frame) }
        guard out.verdict == .redirect else { return nil }
        let length = client.count, destinationAt = (length == 4 ? 26 : 22) + length, l4 = length == 4 ? 34 : 54
        return (Array(out.packet[destinationAt..<(destinationAt + length)]), UInt16(out.packet[l4]) << 8 | UInt16(out.packet[l4 + 1]))
    }

    /// Weights 1:2:3 hold for 12,000 new flows, each endpoint's share within 2 points of
    /// its weight's, for a random plan and for a Maglev one.
    func testWeightsHoldForRandomAndMaglevPlans() throws {
        let scratch = try RoutedScratchNamespace()
        let relay = try KernelRelay(capacity: 1 << 16)
        try relay.setNATPorts(first: 20000, count: 40000)  // 6,000 flows to the heaviest endpoint
        let endpoints = ["203.0.113.10", "203.0.113.11", "203.0.113.12"], weights = [1, 2, 3], slots: [UInt32] = [0, 1, 2]
        for (position, slot) in slots.enumerated() {
            try relay.setEndpoint(slot: Int(slot), KernelRelay.Endpoint(address: Frames.ip(endpoints[position]), port: Self.endpointPort))
        }
        let alias = AliasTable(weights: weights)
        let maglev = MaglevTable(endpoints: zip(endpoints, weights).map { (address: SocketAddress(ip: Frames.ip($0), port: Self.endpointPort), weight: $1) })
        let plans = [
            ("random", KernelRelayPlan.random(keep: alias.keep, alias: alias.alias, slots: slots, weights: weights)),
            ("maglev", KernelRelayPlan.maglev(table: maglev.slots, slots: slots, weights: weights, hashKey: .sourceIPPort)),
        ]
        for (listener, (name, words)) in plans.enumerated() {
            let service = Frames.Endpoint(ip: Frames.ip("198.51.100.1"), port: UInt16(90 + listener))
            try relay.setService(address: service.ip, port: service.port, listener: listener)
            try relay.setPlan(listener: listener, words: words)
            var counts = [[UInt8]: Int]()
            let flows = 12_000
            for i in 0..<flows {
                let client = Frames.ip("198.51.100.\(2 + i % 200)")
                guard let (endpoint, _) = try pick(relay, in: scratch, client: client, port: UInt16(2000 + i / 200), service: service) else {
                    return XCTFail("\(name): SYN \(i) was not taken")
                }
                counts[endpoint, default: 0] += 1
            }
            for (position, endpoint) in endpoints.enumerated() {
                let share = Double(counts[Frames.ip(endpoint)] ?? 0) / Double(flows)
                let expected = Double(weights[position]) / 6
                XCTAssertEqual(share, expected, accuracy: 0.02, "\(name): \(endpoint) took \(share)")
            }
        }
    }

    /// A new plan (endpoints listed in another order, one weight changed) takes new flows at
    /// once, while a flow already installed keeps its endpoint; and once every NAT port
    /// toward an endpoint is taken, the next SYN is left to the stack, counted.
    func testPlanSwapKeepsEstablishedFlowsAndNATPortsRunOutToTheStack() throws {
        let scratch = try RoutedScratchNamespace()
        let relay = try KernelRelay(capacity: 1 << 12)
        try relay.setNATPorts(first: 61000, count: 2)
        let endpoints = ["203.0.113.10", "203.0.113.11"]
        for (slot, endpoint) in endpoints.enumerated() {
            try relay.setEndpoint(slot: slot, KernelRelay.Endpoint(address: Frames.ip(endpoint), port: Self.endpointPort))
        }
        let service = Frames.Endpoint(ip: Frames.ip("198.51.100.1"), port: 80)
        try relay.setService(address: service.ip, port: 80, listener: 0)
        func maglev(_ weights: [Int]) -> [UInt32] {
            let table = MaglevTable(endpoints: zip(endpoints, weights).map { (address: SocketAddress(ip: Frames.ip($0), port: Self.endpointPort), weight: $1) },
                                    size: 251)
            return KernelRelayPlan.maglev(table: table.slots, slots: [0, 1], weights: weights, hashKey: .sourceIP)
        }
        try relay.setPlan(listener: 0, words: maglev([1, 0]))
        let first = try XCTUnwrap(try pick(relay, in: scratch, client: Frames.ip("198.51.100.2"), port: 3000, service: service))
        XCTAssertEqual(first.endpoint, Frames.ip(endpoints[0]))
        try relay.setPlan(listener: 0, words: maglev([0, 1]))
        let again = try XCTUnwrap(try pick(relay, in: scratch, client: Frames.ip("198.51.100.2"), port: 3000, service: service))
        XCTAssertEqual(again.endpoint, Frames.ip(endpoints[0]), "an installed flow keeps its endpoint through a plan swap")
        XCTAssertEqual(again.natPort, first.natPort)
        let moved = try XCTUnwrap(try pick(relay, in: scratch, client: Frames.ip("198.51.100.2"), port: 3001, service: service))
        XCTAssertEqual(moved.endpoint, Frames.ip(endpoints[1]), "a new flow follows the new plan")
        let second = try XCTUnwrap(try pick(relay, in: scratch, client: Frames.ip("198.51.100.3"), port: 3001, service: service))
        XCTAssertNotEqual(second.natPort, moved.natPort, "one port per flow toward an endpoint")
        XCTAssertNil(try pick(relay, in: scratch, client: Frames.ip("198.51.100.4"), port: 3001, service: service),
                     "both NAT ports toward the endpoint are taken: the SYN is the stack's")
        XCTAssertEqual(relay.totals().fallbackNoPort, 1)
        XCTAssertEqual(relay.totals().newFlows, 3)

        // Once one of them has closed (a FIN each way) and been quiet for a second, its port
        // is free for the next flow. (A fixed wait: the rule is about time passing.)
        let finAck: UInt8 = 0x11
        let closing = Frames.Endpoint(ip: Frames.ip("198.51.100.3"), port: 3001)
        let endpoint = Frames.Endpoint(ip: Frames.ip(endpoints[1]), port: Self.endpointPort)
        let nat = Frames.Endpoint(ip: Frames.ip("203.0.113.1"), port: second.natPort)
        try scratch.run {
            XCTAssertEqual(try relay.run(Frames.frame(.tcp, from: closing, to: service, payload: [], tcpFlags: finAck)).verdict, .redirect)
        }
        XCTAssertNil(try pick(relay, in: scratch, client: Frames.ip("198.51.100.4"), port: 3002, service: service),
                     "a flow half closed keeps its port")
        try scratch.run {
            XCTAssertEqual(try relay.run(Frames.frame(.tcp, from: endpoint, to: nat, payload: [], tcpFlags: finAck)).verdict, .redirect)
        }
        XCTAssertNil(try pick(relay, in: scratch, client: Frames.ip("198.51.100.4"), port: 3003, service: service),
                     "closed, but its last packet is not a second old yet")
        usleep(1_100_000)
        let reused = try XCTUnwrap(try pick(relay, in: scratch, client: Frames.ip("198.51.100.4"), port: 3004, service: service))
        XCTAssertEqual(reused.natPort, second.natPort, "the closed flow's port")
        XCTAssertEqual(relay.totals().natPortsReused, 1)
    }
}
