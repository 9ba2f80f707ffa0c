import Yams

/// `kernel_relay:` and what a listener the kernel forwards may not ask for: every
/// setting the kernel path cannot honour is refused by name, never silently proxied.
extension ConfigWalker {
    mutating func kernelRelay(_ node: Node, _ path: String) -> Config.KernelRelay {
        var settings = Config.KernelRelay()
        guard let fields = mapping(node, path, keys: ["interfaces", "nat_ports", "flows"]) else { return settings }
        if let n = fields["interfaces"] { settings.interfaces = interfaceNames(n, "\(path).interfaces", required: true) }
        if let n = fields["nat_ports"], let text = string(n, "\(path).nat_ports") {
            let parts = text.split(separator: "-", omittingEmptySubsequences: false)
            if parts.count == 2, let first = Int(parts[0]), let last = Int(parts[1]), 1024 <= first, first <= last, last <= 65535 {
                settings.natPorts = first...last
            } else {
                fail("\(path).nat_ports", "'\(text)': expected FIRST-LAST within 1024-65535")
            }
        }
        if let n = fields["flows"], let v = int(n, "\(path).flows", Config.KernelRelay.flowRange) { settings.flows = v }
        return settings
    }

    /// A forwarded listener's own settings the kernel path cannot honour; `fields` are the
    /// ones the config set (a udp listener's tcp-only settings are refused already).
    mutating func checkKernelListener(_ listener: Config.Listener, fields: [String: Node], _ path: String) {
        if listener.tls != nil { fail("\(path).relay", "kernel cannot terminate TLS; remove tls or use relay: user") }
        if !listener.routes.isEmpty { fail("\(path).relay", "kernel cannot route by server name; remove routes or use relay: user") }
        if listener.proxyProtocol != .none { fail("\(path).relay", "kernel cannot send a PROXY protocol header; set proxy_protocol: none") }
        if fields["clusters"] != nil { fail("\(path).clusters", "relay: kernel sends a listener to one cluster; use cluster:") }
        if listener.address.ip.allSatisfy({ $0 == 0 }) {
            fail("\(path).address", "relay: kernel needs the listener's own address (a wildcard would take traffic routed through this host)")
        }
        if fields["max_connections"] != nil { fail("\(path).max_connections", "relay: kernel bounds flows with kernel_relay.flows; remove it") }
        if fields["connect_attempts"] != nil {
            fail("\(path).connect_attempts", "relay: kernel makes one attempt (the client's SYN retries); remove it")
        }
        if fields["send_timeout"] != nil { fail("\(path).send_timeout", "relay: kernel holds no bytes; remove it") }
        if fields["max_sessions"] != nil { fail("\(path).max_sessions", "relay: kernel bounds flows with kernel_relay.flows; remove it") }
    }

    /// What depends on the whole config: the section itself, the clusters behind kernel
    /// listeners, ports.
    mutating func checkKernelRelay(_ config: Config) {
        let kernelListeners = config.listeners.indices.filter { config.listeners[$0].forwardedInKernel }
        guard let firstKernel = kernelListeners.first else { return }
        if config.kernelRelay.interfaces.isEmpty {
            let listener = config.listeners[firstKernel]
            fail("kernel_relay.interfaces", "required by listeners[\(firstKernel)] (relay: kernel on \(listener.transport == .tcp ? "tcp" : "udp away from loopback"))")
        }
        var endpointsBehind = Set<String>()
        for l in kernelListeners {
            let listener = config.listeners[l]
            if let rate = listener.rateLimit, rate.maxConnections != nil {
                fail("listeners[\(l)].rate_limit.per_source.max_connections",
                     "relay: kernel cannot count a source's open flows; use new_connections")
            }
            guard let name = listener.clusters.first?.name, let c = config.clusters.firstIndex(where: { $0.name == name }) else { continue }
            let cluster = config.clusters[c]
            if cluster.balancer != .maglev && cluster.balancer != .random {
                fail("listeners[\(l)].relay", "kernel runs maglev or random; cluster \"\(name)\" uses \(cluster.balancer.rawValue)")
            }
            if cluster.slowStart.milliseconds > 0 {
                fail("listeners[\(l)].relay", "kernel cannot ramp weights; cluster \"\(name)\" has slow_start: \(cluster.slowStart)")
            }
            if cluster.maxConnections != nil { fail("listeners[\(l)].relay", "kernel cannot enforce max_connections of cluster \"\(name)\"") }
            if cluster.tls != nil { fail("listeners[\(l)].relay", "kernel cannot originate TLS to cluster \"\(name)\"") }
            let v4 = listener.address.ip.count == 4
            for (e, endpoint) in cluster.endpoints.enumerated() {
                let at = "clusters[\(c)].endpoints[\(e)]"
                if endpoint.maxConnections != nil {
                    fail("listeners[\(l)].relay", "kernel cannot enforce max_connections of endpoint \(endpoint.address)")
                }
                if endpoint.address.isLoopback {
                    fail("\(at).address", "relay: kernel forwards to remote endpoints; \(endpoint.address) is on loopback")
                } else if (endpoint.address.ip.count == 4) != v4 {
                    fail("\(at).address", "relay: kernel cannot translate between IPv4 and IPv6 (listeners[\(l)] is \(v4 ? "IPv4" : "IPv6"))")
                }
                endpointsBehind.insert("\(name) \(endpoint.address)")
            }
        }
        if endpointsBehind.count > KernelRelayLimits.endpointSlots {
            fail("clusters", "listeners with relay: kernel reach \(endpointsBehind.count) endpoints; at most \(KernelRelayLimits.endpointSlots)")
        }
        let ports = config.kernelRelay.natPorts
        for (l, listener) in config.listeners.enumerated() where ports.contains(Int(listener.address.port)) {
            fail("kernel_relay.nat_ports", "contains port \(listener.address.port) of listeners[\(l)]")
        }
        if ports.contains(Int(config.admin.address.port)) {
            fail("kernel_relay.nat_ports", "contains port \(config.admin.address.port) of admin.address")
        }
    }
}

/// The kernel forwarder's fixed room (`bpf/kernel_relay.h`), for `check`, which must not
/// need the BPF object.
enum KernelRelayLimits {
    static let endpointSlots = 8192
}
