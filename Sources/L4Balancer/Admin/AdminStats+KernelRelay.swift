import BPFSteer
import Foundation

/// `/stats`' `kernel_relay`: where the kernel forwarder runs and what it counted over the
/// whole table, or null when no listener uses it; and each kernel listener's and endpoint's
/// own `kernel_relay` counts. A SYN it leaves to the stack is counted as a fallback by
/// reason, and the workers then accept and proxy it as any other connection.
extension WorkerPool {
    func kernelRelayDocument() -> Any {
        guard let forwarder = kernelForwarder else { return NSNull() }
        let totals = forwarder.relay.totals()
        let expiry = forwarder.expiry
        return [
            "interfaces": forwarder.relay.attachedInterfaces.map { ["name": $0, "attach": "tcx"] },
            "nat_ports": "\(forwarder.settings.natPorts.lowerBound)-\(forwarder.settings.natPorts.upperBound)",
            "flows_capacity": forwarder.settings.flows,
            "table_entries": expiry.tableEntries,
            "unavailable_endpoints": forwarder.unavailableEndpoints,
            "expired": ["idle": expiry.idle, "closed": expiry.closed, "half_open": expiry.halfOpen],
            "new_flows": totals.newFlows,
            "forwarded_packets": totals.forwarded,
            "nat_ports_reused": totals.natPortsReused,
            "icmp_translated": totals.icmpTranslated,
            "mss_clamped": totals.mssClamped,
            "fallbacks": [
                "paused": totals.fallbackPaused, "no_endpoint": totals.fallbackNoEndpoint, "no_route": totals.fallbackNoRoute,
                "no_port": totals.fallbackNoPort, "table_full": totals.fallbackTableFull,
            ],
            "drops": ["no_route": totals.droppedNoRoute, "forwarding_off": totals.droppedForwardingOff, "mtu": totals.droppedMTU],
        ] as [String: Any]
    }

    /// A tcp kernel listener's (or its endpoint's) flows: started, held at the last sweep,
    /// packets and payload bytes each way (`in`: the client's direction), the endpoints'
    /// answers to the kernel's SYNs (failures: a RST, an ICMP error, or none within
    /// `connect_timeout`), and, for a listener, SYNs left to the workers and flows closed
    /// under `on_unhealthy: close`.
    func kernelTrafficEntry(_ traffic: (counts: KernelRelay.Traffic, active: Int), listener id: Int?) -> [String: Any] {
        let c = traffic.counts
        var entry: [String: Any] = [
            "flows": c.flows, "flows_active": traffic.active,
            "packets_in": c.packetsIn, "bytes_in": c.bytesIn, "packets_out": c.packetsOut, "bytes_out": c.bytesOut,
            "connect_successes": c.connectSuccesses, "connect_failures": c.connectFailures,
        ]
        if let id {
            entry["fallbacks"] = c.fallbacks
            entry["closed_unhealthy"] = kernelForwarder?.closedUnhealthy(listener: id) ?? 0
        }
        return entry
    }
}
