internal import CBPF
import Foundation

/// The kernel forwarder's core (`bpf/kernel_relay.bpf.c`, issue 35): a tc program that
/// rewrites the packets of installed flows with full NAT and redirects them to the egress
/// interface the FIB names. Steps 2 and 3 of docs/kernel-forwarding-plan.md: the flow
/// table is filled from user space, the program runs on test packets (`run(_:)`,
/// BPF_PROG_TEST_RUN) or on an interface's ingress (`attach(to:)`, tcx); no listener uses
/// it yet.
///
/// The interfaces it is attached to must forward (`net.ipv4.conf.IF.forwarding`,
/// `net.ipv6.conf.IF.forwarding`): the kernel's FIB lookup for a packet arriving on an
/// interface refuses otherwise, and the packet is dropped and counted
/// (`Totals.droppedForwardingOff`).
///
/// Not thread-safe to create or attach; the flow table is, as map updates are.
public final class KernelRelay: @unchecked Sendable {
    /// Entries the flow table holds (a flow is two, one per direction).
    public let capacity: Int
    private let object: OpaquePointer
    private let programFD: Int32
    private let flowsFD: Int32
    private let countersFD: Int32
    private let cpus: Int
    /// CPUs the per-CPU maps hold a value for.
    var cpuCount: Int { cpus }
    /// tcx links by interface name; closing one detaches the program there.
    private var links: [String: Int32] = [:]

    public init(capacity: Int = 1 << 18) throws(BPFError) {
        self.capacity = capacity
        let opened = try loadUnpinnedObject(KernelRelayObject.base64, name: "l4lb_kernel_relay", what: "kernel relay",
                                            sizing: "kr_flows", to: capacity)
        object = opened
        programFD = bpf_program__fd(bpf_object__find_program_by_name(opened, "l4lb_kernel_relay"))
        flowsFD = bpf_map__fd(bpf_object__find_map_by_name(opened, "kr_flows"))
        countersFD = bpf_map__fd(bpf_object__find_map_by_name(opened, "kr_counters"))
        do {
            cpus = try possibleCPUs()
        } catch {
            bpf_object__close(opened)
            throw error
        }
    }

    deinit {
        for fd in links.values { close(fd) }
        bpf_object__close(object)
    }

    /// The descriptor of one of the program's maps, by name.
    func mapFD(_ name: String) -> Int32 { bpf_map__fd(bpf_object__find_map_by_name(object, name)) }

    /// Runs the program on `interface`'s ingress (a tcx link, Linux 6.6+, after any
    /// program already there) in the calling thread's network namespace, until `detach`
    /// or the end of the process. Attaching twice to one interface is a no-op.
    public func attach(to interface: String) throws(BPFError) {
        guard links[interface] == nil else { return }
        let ifindex = if_nametoindex(interface)
        guard ifindex != 0 else { throw BPFError("interface \(interface)", code: ENODEV) }
        let link = l4lb_tcx_ingress_link_create(programFD, Int32(ifindex))
        guard link >= 0 else { throw BPFError("attaching the kernel relay to \(interface) ingress (tcx, Linux 6.6+)", code: link) }
        links[interface] = link
    }

    /// Stops running the program on `interface`.
    public func detach(from interface: String) {
        guard let link = links.removeValue(forKey: interface) else { return }
        close(link)
    }

    /// The interfaces the program runs on, by name.
    public var attachedInterfaces: [String] { links.keys.sorted() }

    /// What the program counted over the whole table, summed over CPUs.
    public struct Totals: Sendable, Equatable {
        /// Packets rewritten and redirected (a GSO skb counts once).
        public var forwarded: UInt64 = 0
        /// Dropped: the FIB had no route to the rewritten destination.
        public var droppedNoRoute: UInt64 = 0
        /// Dropped: forwarding is off on the interface the packet arrived on.
        public var droppedForwardingOff: UInt64 = 0
        /// Dropped: bigger than the egress route's MTU (a TCP segment; a datagram of a UDP
        /// session goes to its worker, which sends it in fragments).
        public var droppedMTU: UInt64 = 0
        /// SYNs to a service the kernel took (an endpoint picked, both entries installed).
        public var newFlows: UInt64 = 0
        /// SYNs to a service left to the stack, by reason.
        public var fallbackPaused: UInt64 = 0
        public var fallbackNoEndpoint: UInt64 = 0
        public var fallbackNoRoute: UInt64 = 0
        public var fallbackNoPort: UInt64 = 0
        public var fallbackTableFull: UInt64 = 0
        /// New flows that took the NAT port of a flow closed both ways or reset.
        public var natPortsReused: UInt64 = 0
        /// ICMP errors about a kernel flow's packets, translated and sent on to their sender.
        public var icmpTranslated: UInt64 = 0
        /// SYNs and SYN-ACKs whose MSS was lowered to fit the route they left by.
        public var mssClamped: UInt64 = 0
        public init() {}
    }

    public func totals() -> Totals {
        var values = [UInt64](repeating: 0, count: cpus)
        func sum(_ counter: l4lb_kr_counter) -> UInt64 {
            var key = UInt32(counter.rawValue)
            guard bpf_map_lookup_elem(countersFD, &key, &values) == 0 else { return 0 }
            return values.reduce(0, &+)
        }
        var totals = Totals()
        totals.forwarded = sum(L4LB_KR_FORWARDED)
        totals.droppedNoRoute = sum(L4LB_KR_DROP_NO_ROUTE)
        totals.droppedForwardingOff = sum(L4LB_KR_DROP_FORWARDING_OFF)
        totals.droppedMTU = sum(L4LB_KR_DROP_MTU)
        totals.newFlows = sum(L4LB_KR_NEW_FLOWS)
        totals.fallbackPaused = sum(L4LB_KR_FALLBACK_PAUSED)
        totals.fallbackNoEndpoint = sum(L4LB_KR_FALLBACK_NO_ENDPOINT)
        totals.fallbackNoRoute = sum(L4LB_KR_FALLBACK_NO_ROUTE)
        totals.fallbackNoPort = sum(L4LB_KR_FALLBACK_NO_PORT)
        totals.fallbackTableFull = sum(L4LB_KR_FALLBACK_TABLE_FULL)
        totals.natPortsReused = sum(L4LB_KR_NAT_PORT_REUSED)
        totals.icmpTranslated = sum(L4LB_KR_ICMP_TRANSLATED)
        totals.mssClamped = sum(L4LB_KR_MSS_CLAMPED)
        return totals
    }

    /// What the program counted on one direction of a flow.
    public struct Counters: Sendable, Equatable {
        public var packets: UInt64 = 0
        /// TCP or UDP payload bytes.
        public var bytes: UInt64 = 0
        /// CLOCK_MONOTONIC nanoseconds of the last packet (or of the install).
        public var lastNanoseconds: UInt64 = 0
        public init() {}

        init(_ flow: l4lb_kr_flow) {
            packets = flow.packets
            bytes = flow.bytes
            lastNanoseconds = flow.last_ns
        }
    }

    /// Packets matching `match` become `rewrite`; 0, or the errno (E2BIG or ENOMEM: the
    /// table is full; EEXIST: `match` is taken). `listener` is the identity the entry is
    /// counted under; a `session` entry belongs to a worker's UDP session, which removes it
    /// (`take`): the sweeper leaves it alone.
    public func install(_ match: KernelRelayTuple, rewrite: KernelRelayTuple, listener: Int = 0, session: Bool = false) -> Int32 {
        var key = match.key
        var flow = l4lb_kr_flow()
        flow.saddr = rewrite.key.saddr
        flow.daddr = rewrite.key.daddr
        flow.sport = rewrite.key.sport
        flow.dport = rewrite.key.dport
        flow.listener = UInt16(truncatingIfNeeded: listener)
        flow.endpoint = UInt16(L4LB_KR_NO_SLOT)
        flow.state = session ? UInt8(L4LB_KR_STATE_SESSION) : 0
        flow.last_ns = Self.monotonicNanoseconds()
        return bpf_map_update_elem(flowsFD, &key, &flow, UInt64(BPF_NOEXIST)) == 0 ? 0 : errno
    }

    /// The counts so far on `match`; nil when it is not installed.
    public func counters(_ match: KernelRelayTuple) -> Counters? {
        var key = match.key
        var flow = l4lb_kr_flow()
        guard bpf_map_lookup_elem(flowsFD, &key, &flow) == 0 else { return nil }
        return Counters(flow)
    }

    /// Removes `match`, returning its last counts (nil when it was not installed).
    public func take(_ match: KernelRelayTuple) -> Counters? {
        var key = match.key
        var flow = l4lb_kr_flow()
        guard bpf_map_lookup_and_delete_elem(flowsFD, &key, &flow) == 0 else {
            // Hash maps take lookup-and-delete from Linux 5.14; before, two calls.
            guard errno != ENOENT, bpf_map_lookup_elem(flowsFD, &key, &flow) == 0 else { return nil }
            bpf_map_delete_elem(flowsFD, &key)
            return Counters(flow)
        }
        return Counters(flow)
    }

    /// What the program decided for one packet.
    public enum Verdict: Equatable, Sendable {
        /// Left to the next program or the stack (TCX_NEXT).
        case next
        /// Passed on to the stack (TC_ACT_OK).
        case pass
        /// Dropped (TC_ACT_SHOT).
        case drop
        /// Rewritten and redirected to its egress interface (TC_ACT_REDIRECT; a test run
        /// returns the packet instead of sending it).
        case redirect
        case other(Int32)
    }

    /// Runs the program once on `packet` (an Ethernet frame) and returns its verdict and
    /// the frame as it left. It runs in the calling thread's network namespace, as if the
    /// frame had arrived on its `lo`: the FIB lookup is that namespace's.
    public func run(_ packet: [UInt8]) throws(BPFError) -> (verdict: Verdict, packet: [UInt8]) {
        var out = [UInt8](repeating: 0, count: packet.count + 256)
        var size = UInt32(out.count)
        var result: UInt32 = 0
        let err = packet.withUnsafeBytes { input in
            out.withUnsafeMutableBytes { l4lb_prog_test_run(programFD, input.baseAddress, UInt32(input.count), $0.baseAddress, &size, &result) }
        }
        guard err == 0 else { throw BPFError("running the kernel relay on a test packet", code: err) }
        let verdict: Verdict = switch Int32(bitPattern: result) {
        case -1: .next
        case 0: .pass
        case 2: .drop
        case 7: .redirect
        case let other: .other(other)
        }
        return (verdict, Array(out.prefix(Int(size))))
    }
}

/// One direction of a flow as the forwarder matches it: protocol, addresses and ports.
public struct KernelRelayTuple: Sendable, Equatable {
    fileprivate var key = l4lb_kr_tuple()

    public enum TransportProtocol: UInt8, Sendable { case tcp = 6, udp = 17 }

    /// `source` and `destination` are IP addresses in network order, 4 or 16 bytes each,
    /// of one family; nil otherwise.
    public init?(_ transport: TransportProtocol, source: [UInt8], sourcePort: UInt16, destination: [UInt8], destinationPort: UInt16) {
        guard source.count == destination.count, source.count == 4 || source.count == 16 else { return nil }
        withUnsafeMutableBytes(of: &key.saddr) { $0.copyBytes(from: source) }
        withUnsafeMutableBytes(of: &key.daddr) { $0.copyBytes(from: destination) }
        key.sport = sourcePort.bigEndian
        key.dport = destinationPort.bigEndian
        key.protocol = transport.rawValue
        key.family = source.count == 4 ? 4 : 6
    }

    /// From two socket addresses (`sockaddr_in` or `sockaddr_in6`, an IPv4-mapped IPv6
    /// address taken as IPv4, as its packets are); nil unless both are of one family.
    public init?(_ transport: TransportProtocol, source: UnsafeRawPointer, destination: UnsafeRawPointer) {
        guard let (from, fromPort) = Self.address(source), let (to, toPort) = Self.address(destination) else { return nil }
        self.init(transport, source: from, sourcePort: fromPort, destination: to, destinationPort: toPort)
    }

    private static func address(_ name: UnsafeRawPointer) -> ([UInt8], UInt16)? {
        switch Int32(name.load(as: sa_family_t.self)) {
        case AF_INET:
            let sin = name.load(as: sockaddr_in.self)
            return (withUnsafeBytes(of: sin.sin_addr) { Array($0) }, UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = name.load(as: sockaddr_in6.self)
            let bytes = withUnsafeBytes(of: sin6.sin6_addr) { Array($0) }
            let mapped = bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xFF && bytes[11] == 0xFF
            return (mapped ? Array(bytes[12...]) : bytes, UInt16(bigEndian: sin6.sin6_port))
        default:
            return nil
        }
    }

    /// 4 or 6.
    public var family: Int { Int(key.family) }

    /// Equal as the kernel compares keys: byte for byte.
    public static func == (a: KernelRelayTuple, b: KernelRelayTuple) -> Bool {
        withUnsafeBytes(of: a.key) { x in withUnsafeBytes(of: b.key) { y in x.elementsEqual(y) } }
    }
}

/// CPUs a per-CPU map holds a value for.
func possibleCPUs() throws(BPFError) -> Int {
    let possible = libbpf_num_possible_cpus()
    guard possible > 0 else { throw BPFError("counting possible CPUs", code: -possible) }
    return Int(possible)
}

/// Opens an embedded BPF object whose maps are not pinned, sizes its table `sizing` to
/// `entries`, and loads it into the kernel; `what` names it in errors.
func loadUnpinnedObject(_ base64: String, name: String, what: String, sizing map: String, to entries: Int) throws(BPFError) -> OpaquePointer {
    guard let bytes = Data(base64Encoded: base64) else {
        throw BPFError("decoding the embedded \(what) object", code: EINVAL)
    }
    let opened = bytes.withUnsafeBytes { l4lb_bpf_open_mem_unpinned($0.baseAddress, $0.count, name) }
    guard let opened, libbpf_get_error(UnsafeRawPointer(opened)) == 0 else {
        throw BPFError("opening the \(what) object", code: errno)
    }
    let sized = bpf_map__set_max_entries(bpf_object__find_map_by_name(opened, map), UInt32(clamping: entries))
    guard sized == 0 else {
        bpf_object__close(opened)
        throw BPFError("sizing the \(what)'s table to \(entries)", code: sized)
    }
    let loaded = bpf_object__load(opened)
    guard loaded == 0 else {
        bpf_object__close(opened)
        throw BPFError("loading the \(what) into the kernel", code: loaded)
    }
    return opened
}
