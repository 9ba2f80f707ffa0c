internal import CBPF
import Foundation

/// What the kernel forwarder needs to start flows itself (issue 35, step 4): services
/// (the listeners it takes SYNs for), one plan per listener (the endpoint choice, as words
/// laid out by `bpf/kernel_relay.h`), the endpoints by slot, and the NAT port range. A SYN
/// to a service picks its endpoint from the listener's plan exactly as user space would
/// (`StableHash`, `MaglevTable.lookup`, `AliasTable.pick`), and everything else about the
/// flow is as for an installed one.
extension KernelRelay {
    /// Room for listeners (plans) and endpoint slots.
    public static let listenerCapacity = Int(L4LB_KR_LISTENERS)
    public static let endpointSlotCapacity = Int(L4LB_KR_ENDPOINT_SLOTS)

    /// New flows' NAT ports come from `first ..< first + count`; a count of 0 leaves every
    /// SYN to the stack.
    public func setNATPorts(first: UInt16, count: Int) throws(BPFError) {
        guard count >= 0, Int(first) + count <= 65536 else { throw BPFError("NAT ports \(first)+\(count)", code: EINVAL) }
        var key: UInt32 = 0
        var settings = l4lb_kr_settings(nat_port_first: UInt32(first), nat_port_count: UInt32(count))
        guard bpf_map_update_elem(mapFD("kr_settings"), &key, &settings, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("writing the kernel relay's settings", code: errno)
        }
    }

    /// SYNs to `address` (4 or 16 bytes) and TCP `port` start kernel flows with the plan of
    /// `listener` (< `listenerCapacity`), unless `paused`.
    public func setService(address: [UInt8], port: UInt16, listener: Int, paused: Bool = false) throws(BPFError) {
        var key = try Self.serviceKey(address: address, port: port)
        guard listener >= 0, listener < Self.listenerCapacity else { throw BPFError("listener \(listener)", code: EINVAL) }
        var service = l4lb_kr_service(listener: UInt32(listener), flags: paused ? UInt32(L4LB_KR_SERVICE_PAUSED) : 0)
        guard bpf_map_update_elem(mapFD("kr_services"), &key, &service, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("writing a kernel relay service", code: errno)
        }
    }

    /// SYNs to `address`:`port` go to the stack again. Established flows are unaffected.
    public func removeService(address: [UInt8], port: UInt16) throws(BPFError) {
        var key = try Self.serviceKey(address: address, port: port)
        guard bpf_map_delete_elem(mapFD("kr_services"), &key) == 0 || errno == ENOENT else {
            throw BPFError("removing a kernel relay service", code: errno)
        }
    }

    /// Replaces `listener`'s plan with `words` in one step: a SYN sees the old plan or the
    /// new one, never a mix.
    public func setPlan(listener: Int, words: [UInt32]) throws(BPFError) {
        guard listener >= 0, listener < Self.listenerCapacity else { throw BPFError("listener \(listener)", code: EINVAL) }
        guard !words.isEmpty, words.count < Int(UInt32.max) else { throw BPFError("a plan of \(words.count) words", code: EINVAL) }
        let inner = l4lb_inner_array_create(UInt32(words.count))
        guard inner >= 0 else { throw BPFError("creating a kernel relay plan of \(words.count) words", code: -inner) }
        defer { close(inner) }  // the outer map holds its own reference
        var keys = (0..<UInt32(words.count)).map { $0 }
        var values = words
        var written = UInt32(words.count)
        let filled = bpf_map_update_batch(inner, &keys, &values, &written, nil)
        guard filled == 0 else { throw BPFError("filling a kernel relay plan", code: -filled) }
        var key = UInt32(listener)
        var fd = UInt32(inner)
        guard bpf_map_update_elem(mapFD("kr_plans"), &key, &fd, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("installing a kernel relay plan", code: errno)
        }
    }

    /// An endpoint as plans name it, by `slot` (< `endpointSlotCapacity`).
    public struct Endpoint: Sendable, Equatable {
        public var address: [UInt8]
        public var port: UInt16
        public var available: Bool
        public var identity: UInt32
        /// `StableHash.hash` of its cluster's name: with `identity`, what lets a restart
        /// find its slots again.
        public var clusterTag: UInt64

        public init(address: [UInt8], port: UInt16, available: Bool = true, identity: UInt32 = 0, clusterTag: UInt64 = 0) {
            self.address = address
            self.port = port
            self.available = available
            self.identity = identity
            self.clusterTag = clusterTag
        }
    }

    public func setEndpoint(slot: Int, _ endpoint: Endpoint) throws(BPFError) {
        guard slot >= 0, slot < Self.endpointSlotCapacity, endpoint.address.count == 4 || endpoint.address.count == 16 else {
            throw BPFError("endpoint slot \(slot)", code: EINVAL)
        }
        var key = UInt32(slot)
        var value = l4lb_kr_endpoint()
        withUnsafeMutableBytes(of: &value.addr) { $0.copyBytes(from: endpoint.address) }
        value.port = endpoint.port.bigEndian
        value.family = endpoint.address.count == 4 ? 4 : 6
        value.unavailable = endpoint.available ? 0 : 1
        value.identity = endpoint.identity
        value.cluster_tag = endpoint.clusterTag
        guard bpf_map_update_elem(mapFD("kr_endpoints"), &key, &value, UInt64(BPF_ANY)) == 0 else {
            throw BPFError("writing kernel relay endpoint slot \(slot)", code: errno)
        }
    }

    private static func serviceKey(address: [UInt8], port: UInt16) throws(BPFError) -> l4lb_kr_service_key {
        guard address.count == 4 || address.count == 16 else { throw BPFError("a service address of \(address.count) bytes", code: EINVAL) }
        var key = l4lb_kr_service_key()
        withUnsafeMutableBytes(of: &key.addr) { $0.copyBytes(from: address) }
        key.port = port.bigEndian
        key.protocol = 6
        key.family = address.count == 4 ? 4 : 6
        return key
    }
}

/// A listener's plan laid out as the forwarder reads it (`bpf/kernel_relay.h`). Endpoints
/// are named by kernel slot; positions are the cluster's endpoints in config order.
public enum KernelRelayPlan {
    /// What the flow hash covers, as `FlowHash` computes it.
    public enum HashKey: UInt32, Sendable {
        case sourceIP = 0, sourceIPPort = 1, fiveTuple = 2
    }

    /// A Maglev plan: `table` holds a config position per slot (−1 where empty, as
    /// `MaglevTable.slots`), `slots` the kernel slot of each position, `weights` their
    /// weights (0 ones are never picked, as user space skips them).
    public static func maglev(table: [Int32], slots: [UInt32], weights: [Int], hashKey: HashKey,
                              cluster: UInt32 = 0, generation: UInt32 = 0) -> [UInt32] {
        precondition(slots.count == weights.count && table.count >= 2)
        var words = header(kind: UInt32(L4LB_KR_PLAN_MAGLEV), size: UInt32(table.count), count: slots.count,
                           hashKey: hashKey, cluster: cluster, generation: generation)
        words.reserveCapacity(words.count + table.count + slots.count)
        for position in table { words.append(position < 0 ? L4LB_KR_PLAN_NONE : slots[Int(position)]) }
        words += list(slots: slots, weights: weights)
        return words
    }

    /// A weighted random plan from an alias table (`AliasTable.keep` and `.alias`).
    public static func random(keep: [UInt32], alias: [Int32], slots: [UInt32], weights: [Int],
                              cluster: UInt32 = 0, generation: UInt32 = 0) -> [UInt32] {
        precondition(keep.count == slots.count && alias.count == slots.count && slots.count == weights.count)
        var words = header(kind: UInt32(L4LB_KR_PLAN_RANDOM), size: UInt32(slots.count), count: slots.count,
                           hashKey: .sourceIP, cluster: cluster, generation: generation)
        words += keep
        words += alias.map { UInt32(bitPattern: $0) }
        words += list(slots: slots, weights: weights)
        return words
    }

    private static func header(kind: UInt32, size: UInt32, count: Int, hashKey: HashKey, cluster: UInt32, generation: UInt32) -> [UInt32] {
        var words = [UInt32](repeating: 0, count: Int(L4LB_KR_PLAN_HEADER.rawValue))
        words[Int(L4LB_KR_PLAN_KIND.rawValue)] = kind
        words[Int(L4LB_KR_PLAN_SIZE.rawValue)] = size
        words[Int(L4LB_KR_PLAN_COUNT.rawValue)] = UInt32(count)
        words[Int(L4LB_KR_PLAN_HASH_KEY.rawValue)] = hashKey.rawValue
        words[Int(L4LB_KR_PLAN_CLUSTER.rawValue)] = cluster
        words[Int(L4LB_KR_PLAN_GENERATION.rawValue)] = generation
        return words
    }

    private static func list(slots: [UInt32], weights: [Int]) -> [UInt32] {
        zip(slots, weights).map { slot, weight in weight > 0 ? slot : slot | L4LB_KR_PLAN_WEIGHT_ZERO }
    }
}
