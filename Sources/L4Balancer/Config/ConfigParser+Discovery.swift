import Yams

/// A cluster's `dns:` section (issue 36).
extension ConfigWalker {
    mutating func dnsDiscovery(_ node: Node, _ path: String) -> Config.DNSDiscovery? {
        guard let fields = mapping(node, path, keys: ["name", "type", "port", "resolvers", "min_ttl", "max_ttl", "refresh", "hold", "timeout"]) else {
            return nil
        }
        guard let n = fields["name"], let name = string(n, "\(path).name") else {
            if fields["name"] == nil { fail("\(path).name", "required") }
            return nil
        }
        guard DNSQuery.encodeName(name) != nil, !name.isEmpty else {
            fail("\(path).name", "'\(name)' is not a DNS name")
            return nil
        }
        var dns = Config.DNSDiscovery(name: name)
        if let n = fields["type"], let t = choice(n, "\(path).type", Config.DNSDiscovery.RecordType.self) { dns.type = t }
        if let n = fields["port"] {
            if dns.type == .srv {
                fail("\(path).port", "SRV records carry their own ports; remove it")
            } else if let v = int(n, "\(path).port", 1...65535) {
                dns.port = UInt16(v)
            }
        } else if dns.type != .srv {
            fail("\(path).port", "required for type \(dns.type.rawValue)")
        }
        if let n = fields["resolvers"] {
            dns.resolvers = list(n, "\(path).resolvers", required: true) { walker, item, itemPath in walker.address(item, itemPath) }
        }
        for (key, keyPath) in [("min_ttl", \Config.DNSDiscovery.minTTL), ("max_ttl", \.maxTTL), ("refresh", \.refresh), ("hold", \.hold), ("timeout", \.timeout)] {
            guard let n = fields[key], let d = duration(n, "\(path).\(key)") else { continue }
            if d.milliseconds < 100 { fail("\(path).\(key)", "must be at least 100ms") } else { dns[keyPath: keyPath] = d }
        }
        if dns.minTTL > dns.maxTTL { fail("\(path).min_ttl", "\(dns.minTTL) is above max_ttl \(dns.maxTTL)") }
        return dns
    }
}
