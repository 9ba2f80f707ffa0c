/// Why the filter passed or dropped a packet: the index into its per-CPU counters
/// (`enum l4lb_reason` in bpf/xdp_filter.h, same order). The user-space fallback counts
/// with the same reasons.
public enum FilterReason: Int, CaseIterable, Sendable {
    case noMatch, allowed, notIP, malformed, fragment
    case blockedSourceV4, blockedSourceV6, blockedPortTCP, blockedPortUDP
    /// XDP only: port rules exist and the packet hides its ports (a first fragment cut
    /// before them, an IPv6 header chain deeper than the parser follows).
    case unreachablePorts
    /// XDP only: over a listener's `rate_limit` (user space counts those per listener).
    case rateLimitedNewConnections, rateLimitedPackets

    public var drops: Bool { rawValue >= FilterReason.blockedSourceV4.rawValue }

    /// The metric and `/stats` label.
    public var label: String {
        switch self {
        case .noMatch: "no_match"
        case .allowed: "allowed"
        case .notIP: "not_ip"
        case .malformed: "malformed"
        case .fragment: "fragment"
        case .blockedSourceV4: "blocked_source_v4"
        case .blockedSourceV6: "blocked_source_v6"
        case .blockedPortTCP: "blocked_port_tcp"
        case .blockedPortUDP: "blocked_port_udp"
        case .unreachablePorts: "unreachable_ports"
        case .rateLimitedNewConnections: "rate_limited_new_connections"
        case .rateLimitedPackets: "rate_limited_packets"
        }
    }
}
