import BPFSteer
import Foundation
import Yams

/// `listeners:` — each listener: address, protocol, its cluster or weighted split, timeouts,
/// limits, PROXY protocol, TLS and routes (docs/configuration.md).
extension ConfigWalker {
    mutating func listener(_ node: Node, _ path: String, clusters known: [String: Int]) -> Config.Listener? {
        guard let fields = mapping(node, path, keys: [
            "name", "address", "protocol", "cluster", "clusters", "connect_timeout", "connect_attempts",
            "idle_timeout", "send_timeout", "max_connections", "proxy_protocol", "rate_limit", "tls", "routes",
            "max_sessions", "proxy_responses", "session", "inspect_timeout", "relay",
        ]) else { return nil }

        let address: SocketAddress?
        if let n = fields["address"] { address = self.address(n, "\(path).address") } else {
            fail("\(path).address", "required")
            address = nil
        }

        var targets: [Config.WeightedCluster] = []
        switch (fields["cluster"], fields["clusters"]) {
        case (.some, .some):
            fail(path, "set either cluster or clusters, not both")
        case (.some(let n), nil):
            if let name = string(n, "\(path).cluster") {
                if known[name] == nil, !clustersFromXDS { fail("\(path).cluster", "unknown cluster \"\(name)\"") }
                targets = [Config.WeightedCluster(name: name, weight: 1)]
            }
        case (nil, .some(let n)):
            targets = list(n, "\(path).clusters", required: true) { walker, item, itemPath in
                walker.weightedCluster(item, itemPath, clusters: known)
            }
            if !targets.isEmpty, targets.allSatisfy({ $0.weight == 0 }) {
                fail("\(path).clusters", "at least one cluster needs a weight above 0")
            }
        case (nil, nil):
            fail("\(path).cluster", "required")
        }

        let name: String
        if let n = fields["name"], let s = string(n, "\(path).name") {
            if s.isEmpty { fail("\(path).name", "must not be empty") }
            name = s
        } else {
            name = address?.description ?? path
        }

        guard let address else { return nil }
        var listener = Config.Listener(name: name, address: address, clusters: targets)
        if let n = fields["protocol"], let p = choice(n, "\(path).protocol", Config.Listener.TransportProtocol.self) {
            listener.transport = p
        }
        if listener.transport == .udp {
            // UDP: sessions per client address (DESIGN §3); TCP's connection settings do not apply.
            listener.idleTimeout = Config.Listener.defaultUDPIdleTimeout
            for key in ["connect_timeout", "connect_attempts", "send_timeout", "max_connections", "proxy_protocol", "tls", "routes", "inspect_timeout"]
            where fields[key] != nil {
                fail("\(path).\(key)", "applies to tcp listeners only")
            }
            if let n = fields["session"], let v = choice(n, "\(path).session", Config.Listener.SessionAffinity.self) { listener.session = v }
            if let n = fields["proxy_responses"], let v = int(n, "\(path).proxy_responses", 0...1_000_000) {
                // 0 (no reply expected) suits per-packet leases only: a session would end
                // with its datagram still in flight.
                if v == 0, listener.session != .none { fail("\(path).proxy_responses", "0 applies to session: none only") }
                listener.proxyResponses = v
            }
            if let n = fields["max_sessions"], let v = int(n, "\(path).max_sessions", 1...1_000_000) { listener.maxSessions = v }
            if let n = fields["relay"], let v = choice(n, "\(path).relay", Config.Listener.Relay.self) {
                // The kernel carries a session's datagrams without the worker seeing them:
                // nothing can count its replies or balance each datagram.
                if v == .kernel, listener.session != .client {
                    fail("\(path).relay", "kernel applies to session: client only")
                } else if v == .kernel, listener.proxyResponses != nil {
                    fail("\(path).relay", "kernel cannot count proxy_responses; leave it unset")
                }
                listener.relay = v
            }
        } else {
            for key in ["max_sessions", "proxy_responses", "session"] where fields[key] != nil {
                fail("\(path).\(key)", "applies to udp listeners only")
            }
            if let n = fields["relay"], let v = choice(n, "\(path).relay", Config.Listener.Relay.self) { listener.relay = v }
        }
        if let n = fields["connect_timeout"], let d = duration(n, "\(path).connect_timeout") {
            if d.milliseconds <= 0 { fail("\(path).connect_timeout", "must be greater than 0") }
            listener.connectTimeout = d
        }
        if let n = fields["connect_attempts"], let v = int(n, "\(path).connect_attempts", 1...16) { listener.connectAttempts = v }
        if let n = fields["idle_timeout"], let d = duration(n, "\(path).idle_timeout") { listener.idleTimeout = d }
        if let n = fields["send_timeout"], let d = duration(n, "\(path).send_timeout") { listener.sendTimeout = d }
        if let n = fields["max_connections"], let v = int(n, "\(path).max_connections", 1...10_000_000) { listener.maxConnections = v }
        if let n = fields["proxy_protocol"], let p = choice(n, "\(path).proxy_protocol", Config.Listener.ProxyProtocol.self) {
            listener.proxyProtocol = p
        }
        if listener.transport == .tcp, let n = fields["tls"] { listener.tls = tls(n, "\(path).tls") }
        if listener.transport == .tcp, let n = fields["routes"] {
            listener.routes = routes(n, "\(path).routes", clusters: known)
            if listener.routes.count > WorkerStats.routesPerListener {
                fail("\(path).routes", "\(listener.routes.count) routes; at most \(WorkerStats.routesPerListener) per listener (a route may list many server_names)")
            }
            if fields["tls"] != nil { fail("\(path).routes", "routes pass TLS through by server name; set either tls or routes, not both") }
        }
        if listener.transport == .tcp, let n = fields["inspect_timeout"], let d = duration(n, "\(path).inspect_timeout") {
            if fields["routes"] == nil { fail("\(path).inspect_timeout", "applies to listeners with routes only") }
            if d.milliseconds <= 0 { fail("\(path).inspect_timeout", "must be greater than 0") } else { listener.inspectTimeout = d }
        }
        if listener.forwardedInKernel { checkKernelListener(listener, fields: fields, path) }
        return listener
    }

    mutating func weightedCluster(_ node: Node, _ path: String, clusters known: [String: Int]) -> Config.WeightedCluster? {
        guard let fields = mapping(node, path, keys: ["name", "weight"]) else { return nil }
        guard let n = fields["name"] else {
            fail("\(path).name", "required")
            return nil
        }
        guard let name = string(n, "\(path).name") else { return nil }
        if known[name] == nil, !clustersFromXDS { fail("\(path).name", "unknown cluster \"\(name)\"") }
        var weight = 1
        if let n = fields["weight"], let w = int(n, "\(path).weight", 0...1_000_000) { weight = w }
        return Config.WeightedCluster(name: name, weight: weight)
    }
}
