import BPFSteer
import Yams

/// `rate_limit:` — at the top level (the default, plus `table_size`) and per listener
/// (its own, or `off` to opt out of the default).
extension ConfigWalker {
    mutating func rateLimit(_ node: Node, _ path: String, topLevel: Bool) -> Config.RateLimit? {
        var limit = Config.RateLimit()
        let keys: Set<String> = topLevel ? ["per_source", "exempt", "table_size"] : ["per_source", "exempt"]
        guard let fields = mapping(node, path, keys: keys) else { return nil }
        if let n = fields["per_source"], let source = mapping(n, "\(path).per_source", keys: [
            "new_connections", "packets", "max_connections", "prefix_v4", "prefix_v6",
        ]) {
            let base = "\(path).per_source"
            if let b = source["new_connections"] { limit.newConnections = bucket(b, "\(base).new_connections") }
            if let b = source["packets"] { limit.packets = bucket(b, "\(base).packets") }
            if let v = source["max_connections"], let m = int(v, "\(base).max_connections", 1...16_000_000) { limit.maxConnections = m }
            if let v = source["prefix_v4"], let p = int(v, "\(base).prefix_v4", 1...32) { limit.prefixV4 = p }
            if let v = source["prefix_v6"], let p = int(v, "\(base).prefix_v6", 1...128) { limit.prefixV6 = p }
            if !limit.limitsAnything { fail(base, "set at least one of new_connections, packets, max_connections") }
        } else if fields["per_source"] == nil, !topLevel {
            fail("\(path).per_source", "required")
        }
        if let n = fields["exempt"] {
            limit.exempt = list(n, "\(path).exempt", required: false) { walker, item, itemPath in
                guard let text = walker.string(item, itemPath) else { return nil }
                switch SourcePrefix.parse(text) {
                case .success(let parsed): return parsed
                case .failure(let error):
                    walker.fail(itemPath, error.description)
                    return nil
                }
            }
        }
        return limit.limitsAnything ? limit : nil
    }

    /// `{ rate: 100/s, burst: 200 }`; the rate also as `6000/m` or `1/h`; burst defaults to
    /// one second's worth.
    mutating func bucket(_ node: Node, _ path: String) -> Config.RateLimit.Bucket? {
        guard let fields = mapping(node, path, keys: ["rate", "burst"]) else { return nil }
        guard let r = fields["rate"] else {
            fail("\(path).rate", "required")
            return nil
        }
        guard case .scalar(let scalar) = r, let rate = ConfigWalker.rate(scalar.string) else {
            fail("\(path).rate", "invalid rate \(describe(r)) (use e.g. 100/s, 6000/m, 10/h)")
            return nil
        }
        var burst = max(1, Int(rate.rounded(.up)))
        if let b = fields["burst"], let v = int(b, "\(path).burst", 1...100_000_000) { burst = v }
        return Config.RateLimit.Bucket(rate: rate, burst: min(burst, 100_000_000))
    }

    /// Per second, from `N/s`, `N/m` or `N/h` (N may have a fraction); nil if invalid.
    static func rate(_ text: String) -> Double? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let count = Double(parts[0].trimmingCharacters(in: .whitespaces)),
              count.isFinite, count > 0 else { return nil }
        let perSecond: Double
        switch parts[1].trimmingCharacters(in: .whitespaces) {
        case "s": perSecond = count
        case "m": perSecond = count / 60
        case "h": perSecond = count / 3600
        default: return nil
        }
        guard perSecond <= 1e9, perSecond >= 1.0 / 86_400 else { return nil }
        return perSecond
    }

    /// What a listener enforces: its own `rate_limit` (`off`: none), else the default,
    /// keeping only the parts that apply to its kind. Errors name the listener's field.
    mutating func applyRateLimits(_ config: inout Config, listenerNodes: [Node?]) {
        for i in config.listeners.indices {
            let path = "listeners[\(i)].rate_limit"
            let listener = config.listeners[i]
            var limit: Config.RateLimit?
            var own = false
            if i < listenerNodes.count, let node = listenerNodes[i] {
                if node.string == "off" {
                    config.listeners[i].rateLimit = nil
                    continue
                }
                limit = rateLimit(node, path, topLevel: false)
                own = true
            } else {
                limit = config.rateLimit
            }
            guard var limit else { continue }
            let perPacket = listener.transport == .udp && listener.session == .none
            if listener.transport == .tcp, limit.packets != nil {
                if own { fail("\(path).per_source.packets", "applies to udp listeners only (TCP packets are limited by new_connections)") }
                limit.packets = nil
            }
            if perPacket, limit.newConnections != nil || limit.maxConnections != nil {
                let key = limit.newConnections != nil ? "new_connections" : "max_connections"
                if own { fail("\(path).per_source.\(key)", "a session: none listener has no sessions; limit its packets") }
                limit.newConnections = nil
                limit.maxConnections = nil
            }
            config.listeners[i].rateLimit = limit.limitsAnything ? limit : nil
        }
    }
}
