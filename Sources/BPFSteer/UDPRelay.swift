internal import CBPF
import Foundation

/// l4lb's in-kernel UDP relay (`bpf/udp_relay.bpf.c`): a tc program on `lo` ingress that
/// rewrites the datagrams of sessions the workers hand it, so they go from client to
/// endpoint and back without a trip through user space. Loaded once per process, when a
/// listener first asks for `relay: kernel`, and kept: its flow table is not pinned and its
/// tcx link is not either, so both go away with the process.
///
/// Not thread-safe to create; `flows` is, as map updates are.
public final class UDPRelay: @unchecked Sendable {
    public let interface: String
    /// Flows the table holds (a session is two).
    public let capacity: Int
    public let flows: UDPRelayFlows
    private let object: OpaquePointer
    private let linkFD: Int32

    public init(interface: String = "lo", capacity: Int = 1 << 18) throws(BPFError) {
        self.interface = interface
        self.capacity = capacity
        let opened = try loadUnpinnedObject(UDPRelayObject.base64, name: "l4lb_udp_relay", what: "UDP relay", sizing: "relay_flows", to: capacity)
        let ifindex = if_nametoindex(interface)
        guard ifindex != 0 else {
            bpf_object__close(opened)
            throw BPFError("interface \(interface)", code: ENODEV)
        }
        let program = bpf_program__fd(bpf_object__find_program_by_name(opened, "l4lb_udp_relay"))
        let link = l4lb_tcx_ingress_link_create(program, Int32(ifindex))
        guard link >= 0 else {
            bpf_object__close(opened)
            throw BPFError("attaching the UDP relay to \(interface) ingress (tcx, Linux 6.6+)", code: link)
        }
        object = opened
        linkFD = link
        flows = UDPRelayFlows(fd: bpf_map__fd(bpf_object__find_map_by_name(opened, "relay_flows")))
    }

    deinit {
        close(linkFD)
        bpf_object__close(object)
    }
}

/// The relay's flow table, as the workers use it: a flow per direction of a session.
/// Each call is one bpf(2) system call, made when a session starts, ends or is checked
/// for activity, never per datagram.
public struct UDPRelayFlows: Sendable {
    let fd: Int32

    /// What the program counted on one flow.
    public struct Counters: Sendable, Equatable {
        public var datagrams: UInt64 = 0
        public var bytes: UInt64 = 0
        /// CLOCK_MONOTONIC nanoseconds of the last datagram; 0 = none yet.
        public var lastNanoseconds: UInt64 = 0
        public init() {}

        init(_ flow: l4lb_relay_flow) {
            datagrams = flow.packets
            bytes = flow.bytes
            lastNanoseconds = flow.last_ns
        }
    }

    /// Datagrams matching `match` are rewritten to `rewrite`; 0, or the errno: E2BIG or
    /// ENOMEM (the table is full), EEXIST (another session, of another worker, has the
    /// match: a client can have one session in the kernel).
    public func install(_ match: UDPRelayTuple, rewrite: UDPRelayTuple) -> Int32 {
        var key = match.key
        var flow = l4lb_relay_flow()
        flow.saddr = rewrite.key.saddr
        flow.daddr = rewrite.key.daddr
        flow.sport = rewrite.key.sport
        flow.dport = rewrite.key.dport
        return bpf_map_update_elem(fd, &key, &flow, UInt64(BPF_NOEXIST)) == 0 ? 0 : errno
    }

    public func remove(_ match: UDPRelayTuple) {
        var key = match.key
        _ = bpf_map_delete_elem(fd, &key)
    }

    /// Removes `match`'s flow and returns its last counts (nil: it was not installed).
    public func take(_ match: UDPRelayTuple) -> Counters? {
        var key = match.key
        var flow = l4lb_relay_flow()
        guard bpf_map_lookup_and_delete_elem(fd, &key, &flow) == 0 else { return nil }
        return Counters(flow)
    }

    /// The counts so far on `match`'s flow; nil when it is not installed.
    public func counters(_ match: UDPRelayTuple) -> Counters? {
        var key = match.key
        var flow = l4lb_relay_flow()
        guard bpf_map_lookup_elem(fd, &key, &flow) == 0 else { return nil }
        return Counters(flow)
    }
}

/// One direction of a UDP exchange as the relay matches it: source and destination
/// address and port. Only loopback addresses are relayed (the program sits on `lo`); an
/// IPv4-mapped IPv6 address is IPv4, as its packets are.
public struct UDPRelayTuple: Sendable, Equatable {
    fileprivate var key = l4lb_relay_key()

    /// 4 or 6.
    public var family: Int { Int(key.family) }

    /// From two socket addresses (`sockaddr_in` or `sockaddr_in6`); nil unless both are
    /// loopback addresses of one family.
    public init?(source: UnsafeRawPointer, destination: UnsafeRawPointer) {
        guard let (sourceFamily, sourcePort) = UDPRelayTuple.write(source, into: &key.saddr),
              let (destinationFamily, destinationPort) = UDPRelayTuple.write(destination, into: &key.daddr),
              sourceFamily == destinationFamily
        else { return nil }
        key.family = sourceFamily
        key.sport = sourcePort
        key.dport = destinationPort
    }

    /// The address of `name` into `bytes` (network order, IPv4 in the first 4); its
    /// family (4 or 6) and port, or nil when it is not loopback.
    private static func write<Bytes>(_ name: UnsafeRawPointer, into bytes: inout Bytes) -> (UInt8, UInt16)? {
        switch Int32(name.load(as: sa_family_t.self)) {
        case AF_INET:
            let sin = name.load(as: sockaddr_in.self)
            guard withUnsafeBytes(of: sin.sin_addr) { $0[0] } == 127 else { return nil }
            withUnsafeMutableBytes(of: &bytes) { out in withUnsafeBytes(of: sin.sin_addr) { out.copyBytes(from: $0) } }
            return (4, sin.sin_port)
        case AF_INET6:
            let sin6 = name.load(as: sockaddr_in6.self)
            return withUnsafeBytes(of: sin6.sin6_addr) { address in
                let high = address.loadUnaligned(as: UInt64.self), middle = address.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                if high == 0, middle == UInt32(0x0000_FFFF).bigEndian {
                    guard address[12] == 127 else { return nil }
                    withUnsafeMutableBytes(of: &bytes) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: address[12..<16])) }
                    return (4, sin6.sin6_port)
                }
                guard high == 0, middle == 0, address.loadUnaligned(fromByteOffset: 12, as: UInt32.self) == UInt32(1).bigEndian else { return nil }
                withUnsafeMutableBytes(of: &bytes) { $0.copyMemory(from: address) }
                return (6, sin6.sin6_port)
            }
        default:
            return nil
        }
    }

    public static func == (a: UDPRelayTuple, b: UDPRelayTuple) -> Bool {
        withUnsafeBytes(of: a.key) { x in withUnsafeBytes(of: b.key) { y in x.elementsEqual(y) } }
    }
}
