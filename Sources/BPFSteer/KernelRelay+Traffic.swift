internal import CBPF
import Foundation

/// What the kernel forwarder counted per listener and per endpoint for the flows it started
/// (`kr_listener_stats`, `kr_endpoint_stats`): summed over CPUs, one bpf(2) call each, read
/// for `/stats` and `/metrics`, never on the data path.
extension KernelRelay {
    public struct Traffic: Sendable, Equatable {
        /// The client's direction (client → endpoint): packets (GSO segments) and TCP payload bytes.
        public var packetsIn: UInt64 = 0
        public var bytesIn: UInt64 = 0
        /// The endpoint's direction (endpoint → client).
        public var packetsOut: UInt64 = 0
        public var bytesOut: UInt64 = 0
        /// Flows the kernel started.
        public var flows: UInt64 = 0
        /// SYNs left to the stack, and so to the proxy (per listener only).
        public var fallbacks: UInt64 = 0
        /// The endpoint's first answers to the kernel's SYNs: SYN-ACKs, and RSTs or ICMP errors.
        public var connectSuccesses: UInt64 = 0
        public var connectFailures: UInt64 = 0
        public init() {}
    }

    /// The counts of listener `identity` (< `listenerCapacity`).
    public func traffic(listener identity: Int) -> Traffic {
        traffic(in: "kr_listener_stats", at: identity)
    }

    /// The counts of the endpoint in kernel slot `slot` since `resetTraffic(slot:)`.
    public func traffic(slot: Int) -> Traffic {
        traffic(in: "kr_endpoint_stats", at: slot)
    }

    /// Zeroes slot `slot`'s counts: it is given to an endpoint new to it.
    public func resetTraffic(slot: Int) throws(BPFError) {
        var key = UInt32(slot)
        var zeros = [l4lb_kr_traffic](repeating: l4lb_kr_traffic(), count: cpuCount)
        guard bpf_map_update_elem(mapFD("kr_endpoint_stats"), &key, &zeros, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("clearing kernel relay endpoint slot \(slot)'s counts", code: errno)
        }
    }

    private func traffic(in map: String, at index: Int) -> Traffic {
        var key = UInt32(index)
        var values = [l4lb_kr_traffic](repeating: l4lb_kr_traffic(), count: cpuCount)
        var traffic = Traffic()
        guard index >= 0, bpf_map_lookup_elem(mapFD(map), &key, &values) == 0 else { return traffic }
        for v in values {
            traffic.packetsIn &+= v.packets_in
            traffic.bytesIn &+= v.bytes_in
            traffic.packetsOut &+= v.packets_out
            traffic.bytesOut &+= v.bytes_out
            traffic.flows &+= v.flows
            traffic.fallbacks &+= v.fallbacks
            traffic.connectSuccesses &+= v.connect_successes
            traffic.connectFailures &+= v.connect_failures
        }
        return traffic
    }
}
