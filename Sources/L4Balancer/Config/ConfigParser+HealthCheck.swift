import Yams

/// `clusters[].health_check`: the check type and its own fields, timing, thresholds, and
/// the transport (UDP for clusters behind UDP listeners unless `protocol` says otherwise).
extension ConfigWalker {
    mutating func healthCheck(_ node: Node, _ path: String, cluster: String) -> Config.HealthCheck? {
        guard let fields = mapping(node, path, keys: [
            "type", "interval", "timeout", "healthy_threshold", "unhealthy_threshold", "initial_jitter",
            "interval_jitter", "start_healthy", "send", "expect", "send_hex", "expect_hex", "path", "host",
            "expected_statuses", "protocol", "query", "query_type", "expected_rcode",
        ]) else { return nil }
        var check = Config.HealthCheck()
        let type = fields["type"].flatMap { string($0, "\(path).type") } ?? "tcp"
        let specific: [String: [String]] = [
            "send_expect": ["send", "expect", "send_hex", "expect_hex"], "http": ["path", "host", "expected_statuses"], "tcp": [],
            "dns": ["query", "query_type", "expected_rcode"],
        ]
        guard let allowed = specific[type] else {
            fail("\(path).type", "must be one of tcp, send_expect, http, dns, got \"\(type)\"")
            return nil
        }
        for key in specific.values.joined() where fields[key] != nil && !allowed.contains(key) {
            fail("\(path).\(key)", "applies to type \(specific.first { $0.value.contains(key) }!.key) only")
        }
        switch type {
        case "send_expect":
            let send = bytes(fields, "send", "send_hex", path)
            let expect = bytes(fields, "expect", "expect_hex", path)
            if let send, let expect {
                if expect.isEmpty { fail("\(path).expect", "must not be empty") }
                check.kind = .sendExpect(send: send, expect: expect)
            }
        case "http":
            var requestPath = "/"
            if let n = fields["path"], let p = string(n, "\(path).path") {
                if !p.hasPrefix("/") || p.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) {
                    fail("\(path).path", "must start with / and contain no spaces or line breaks")
                }
                requestPath = p
            }
            let host = fields["host"].flatMap { string($0, "\(path).host") }
            var statuses = 200...399
            if let n = fields["expected_statuses"], let text = string(n, "\(path).expected_statuses") {
                let parts = text.split(separator: "-").map { Int($0.trimmingCharacters(in: .whitespaces)) }
                if parts.count == 1, let a = parts[0], (100...599).contains(a) {
                    statuses = a...a
                } else if parts.count == 2, let a = parts[0], let b = parts[1], (100...599).contains(a), (a...599).contains(b) {
                    statuses = a...b
                } else {
                    fail("\(path).expected_statuses", "expected a status or a range like 200-399, got \"\(text)\"")
                }
            }
            check.kind = .http(path: requestPath, host: host, statuses: statuses)
        case "dns":
            check.kind = dnsCheck(fields, path)
        default:
            check.kind = .tcp
        }
        if let n = fields["protocol"], let p = choice(n, "\(path).protocol", Config.Listener.TransportProtocol.self) {
            check.transport = p
            checkProtocolsGiven.insert(cluster)
        }
        if let n = fields["interval"], let d = duration(n, "\(path).interval") {
            if d.milliseconds < 10 { fail("\(path).interval", "must be at least 10ms") } else { check.interval = d }
        }
        if let n = fields["timeout"], let d = duration(n, "\(path).timeout") {
            if d.milliseconds < 1 {
                fail("\(path).timeout", "must be greater than 0")
            } else if d > Config.HealthCheck.longestTimeout {
                fail("\(path).timeout", "\(d) is longer than a check may wait, \(Config.HealthCheck.longestTimeout)")
            } else {
                check.timeout = d
            }
        }
        if let n = fields["healthy_threshold"], let v = int(n, "\(path).healthy_threshold", 1...100) { check.healthyThreshold = v }
        if let n = fields["unhealthy_threshold"], let v = int(n, "\(path).unhealthy_threshold", 1...100) { check.unhealthyThreshold = v }
        if let n = fields["initial_jitter"], let d = duration(n, "\(path).initial_jitter") {
            // The first check falls within one interval anyway; more only delays it.
            if d > check.interval { fail("\(path).initial_jitter", "must not be longer than the interval (\(check.interval))") } else { check.initialJitter = d }
        }
        if let n = fields["interval_jitter"], let d = duration(n, "\(path).interval_jitter") {
            if d >= check.interval { fail("\(path).interval_jitter", "must be shorter than the interval") } else { check.intervalJitter = d }
        }
        if let n = fields["start_healthy"] { check.startHealthy = bool(n, "\(path).start_healthy") ?? false }
        return check
    }

    /// `key` as text or `hexKey` as hex digits: exactly one of them.
    mutating func bytes(_ fields: [String: Node], _ key: String, _ hexKey: String, _ path: String) -> [UInt8]? {
        switch (fields[key], fields[hexKey]) {
        case (.some, .some):
            fail("\(path).\(key)", "set \(key) or \(hexKey), not both")
        case (.some(let n), nil):
            // Text with the usual escapes written as in YAML double quotes (\r\n).
            // Payloads are bytes: a check may send "PING\r\n".
            return string(n, "\(path).\(key)", controlCharacters: true).map { Array($0.utf8) }
        case (nil, .some(let n)):
            guard let text = string(n, "\(path).\(hexKey)") else { return nil }
            let digits = text.filter { !$0.isWhitespace }
            var out: [UInt8] = []
            var index = digits.startIndex
            while index < digits.endIndex {
                let next = digits.index(index, offsetBy: 2, limitedBy: digits.endIndex) ?? digits.endIndex
                guard let byte = UInt8(digits[index..<next], radix: 16), digits.distance(from: index, to: next) == 2 else {
                    fail("\(path).\(hexKey)", "expected pairs of hex digits, got \"\(text)\"")
                    return nil
                }
                out.append(byte)
                index = next
            }
            return out
        case (nil, nil):
            fail("\(path).\(key)", "required for send_expect")
        }
        return nil
    }

    /// `type: dns`: a query for `query` (default the root), `query_type` (default A), healthy
    /// on an answer whose rcode is in `expected_rcode` (default NOERROR).
    mutating func dnsCheck(_ fields: [String: Node], _ path: String) -> Config.HealthCheck.Kind {
        var name = "."
        if let n = fields["query"], let text = string(n, "\(path).query") {
            if DNSQuery.encodeName(text) == nil {
                fail("\(path).query", "expected a domain name (labels of 1-63 characters, at most 253 in all), got \"\(text)\"")
            } else {
                name = text
            }
        }
        var type: UInt16 = 1
        if let n = fields["query_type"], let text = string(n, "\(path).query_type") {
            if let t = DNSQuery.types[text.uppercased()] ?? UInt16(text) { type = t } else {
                fail("\(path).query_type", "expected one of \(DNSQuery.types.keys.sorted().joined(separator: ", ")) or a number, got \"\(text)\"")
            }
        }
        var rcodes: [UInt8] = [0]
        if let n = fields["expected_rcode"] {
            let items = n.sequence.map { Array($0) } ?? [n]
            rcodes = []
            for (i, item) in items.enumerated() {
                let itemPath = n.sequence == nil ? "\(path).expected_rcode" : "\(path).expected_rcode[\(i)]"
                guard let text = string(item, itemPath) else { continue }
                if let code = DNSQuery.rcodes[text.uppercased()] ?? UInt8(text).flatMap({ $0 < 16 ? $0 : nil }) {
                    rcodes.append(code)
                } else {
                    fail(itemPath, "expected one of \(DNSQuery.rcodes.keys.sorted().joined(separator: ", ")) or 0-15, got \"\(text)\"")
                }
            }
            if items.isEmpty { fail("\(path).expected_rcode", "must not be empty") }
        }
        return .dns(query: name, type: type, rcodes: rcodes)
    }

    /// A cluster's check runs over UDP when only UDP listeners use the cluster, unless the
    /// check names its `protocol`; a UDP check must send something to get an answer.
    mutating func inferHealthCheckProtocols(_ config: inout Config) {
        for (i, cluster) in config.clusters.enumerated() {
            guard var check = cluster.healthCheck else { continue }
            if !checkProtocolsGiven.contains(cluster.name) {
                let users = config.listeners.filter { $0.clusters.contains { $0.name == cluster.name } }
                check.transport = !users.isEmpty && users.allSatisfy { $0.transport == .udp } ? .udp : .tcp
            }
            if check.transport == .udp {
                switch check.kind {
                case .tcp, .http:
                    let inferred = checkProtocolsGiven.contains(cluster.name) ? "" : " (the cluster is behind udp listeners)"
                    fail("clusters[\(i)].health_check.type", "a udp health check must be send_expect or dns\(inferred)")
                case .sendExpect(let send, _):
                    // Over UDP nothing comes back unless something is sent.
                    if send.isEmpty { fail("clusters[\(i)].health_check.send", "must not be empty for a udp health check") }
                case .dns:
                    break
                }
            }
            config.clusters[i].healthCheck = check
        }
    }
}
