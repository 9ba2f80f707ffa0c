import Foundation

/// The running config as JSON for `GET /config`: every field with its default filled in,
/// in the config file's own names and units. The admin token is never shown.
extension Config {
    public var document: [String: Any] {
        var root: [String: Any] = [:]
        switch workers {
        case .auto: root["workers"] = "auto"
        case .count(let n): root["workers"] = n
        }
        root["drain_timeout"] = drainTimeout.description
        root["admin"] = [
            "address": admin.address.description, "token": admin.token == nil ? "none" : "set",
            "allowed_hosts": admin.allowedHosts.sorted(), "max_connections": admin.maxConnections,
            "idle_timeout": admin.idleTimeout.description, "request_timeout": admin.requestTimeout.description,
        ] as [String: Any]
        switch accessLog {
        case .off: root["access_log"] = "off"
        case .on(let path, let format): root["access_log"] = ["path": path, "format": format.rawValue]
        }
        root["buffers"] = ["small": buffers.small, "small_size": buffers.smallSize, "large": buffers.large, "large_size": buffers.largeSize]
        root["listeners"] = listeners.map(\.document)
        root["clusters"] = clusters.map(\.document)
        var limit: [String: Any] = rateLimit?.document ?? [:]
        limit["table_size"] = rateLimitSources
        root["rate_limit"] = limit
        return root
    }
}

extension Config.RateLimit {
    /// As the listener enforces it (the default already applied); rates per second.
    var document: [String: Any] {
        var perSource: [String: Any] = ["prefix_v4": prefixV4, "prefix_v6": prefixV6]
        func bucket(_ b: Bucket) -> [String: Any] { ["rate": "\(b.rate)/s", "burst": b.burst] }
        if let b = newConnections { perSource["new_connections"] = bucket(b) }
        if let b = packets { perSource["packets"] = bucket(b) }
        if let m = maxConnections { perSource["max_connections"] = m }
        return ["per_source": perSource, "exempt": exempt.map(\.description)]
    }
}

extension Config.Listener {
    var document: [String: Any] {
        var entry: [String: Any] = [
            "name": name,
            "address": address.description,
            "protocol": transport.rawValue,
            "idle_timeout": idleTimeout.description,
        ]
        switch transport {
        case .tcp:
            entry["connect_timeout"] = connectTimeout.description
            entry["connect_attempts"] = connectAttempts
            entry["send_timeout"] = sendTimeout.description
            entry["max_connections"] = maxConnections.map { $0 as Any } ?? NSNull()
            entry["proxy_protocol"] = proxyProtocol.rawValue
        case .udp:
            entry["max_sessions"] = maxSessions
            entry["session"] = session.rawValue
            entry["proxy_responses"] = proxyResponses.map { $0 as Any } ?? NSNull()
        }
        entry["rate_limit"] = rateLimit.map { $0.document as Any } ?? "off"
        if clusters.count == 1 {
            entry["cluster"] = clusters[0].name
        } else {
            entry["clusters"] = clusters.map { ["name": $0.name, "weight": $0.weight] }
        }
        return entry
    }
}

extension Config.Cluster {
    var document: [String: Any] {
        var entry: [String: Any] = [
            "name": name,
            "balancer": balancer.rawValue,
            "endpoints": endpoints.map { endpoint -> [String: Any] in
                ["address": endpoint.address.description, "weight": endpoint.weight,
                 "max_connections": endpoint.maxConnections.map { $0 as Any } ?? NSNull()]
            },
            "max_connections": maxConnections.map { $0 as Any } ?? NSNull(),
            "slow_start": slowStart.description,
            "on_unhealthy": onUnhealthy.rawValue,
        ]
        if let dns {
            entry["dns"] = [
                "name": dns.name, "type": dns.type.rawValue, "port": dns.port.map { Int($0) as Any } ?? NSNull(),
                "resolvers": dns.resolvers.map(\.description), "min_ttl": dns.minTTL.description, "max_ttl": dns.maxTTL.description,
                "refresh": dns.refresh.description, "hold": dns.hold.description, "timeout": dns.timeout.description,
            ] as [String: Any]
        }
        switch balancer {
        case .maglev:
            entry["hash_key"] = hashKey.rawValue
            entry["table_size"] = tableSize
        case .ringHash:
            entry["hash_key"] = hashKey.rawValue
            entry["minimum_ring_size"] = minimumRingSize
            entry["hash_balance_factor"] = hashBalanceFactor.map { $0 as Any } ?? NSNull()
        case .leastRequest:
            entry["choice_count"] = choiceCount
            entry["active_request_bias"] = activeRequestBias
        case .roundRobin, .random:
            break
        }
        if let check = healthCheck {
            var c: [String: Any] = [
                "interval": check.interval.description, "timeout": check.timeout.description,
                "healthy_threshold": check.healthyThreshold, "unhealthy_threshold": check.unhealthyThreshold,
                "initial_jitter": check.initialJitter.description, "interval_jitter": check.intervalJitter.description,
                "start_healthy": check.startHealthy, "protocol": check.transport.rawValue,
            ]
            switch check.kind {
            case .tcp: c["type"] = "tcp"
            case .sendExpect(let send, let expect):
                c["type"] = "send_expect"
                c["send_hex"] = send.map { String(format: "%02x", $0) }.joined()
                c["expect_hex"] = expect.map { String(format: "%02x", $0) }.joined()
            case .http(let path, let host, let statuses):
                c["type"] = "http"
                c["path"] = path
                c["host"] = host.map { $0 as Any } ?? NSNull()
                c["expected_statuses"] = "\(statuses.lowerBound)-\(statuses.upperBound)"
            case .dns(let query, let type, let rcodes):
                c["type"] = "dns"
                c["query"] = query
                c["query_type"] = DNSQuery.types.first { $0.value == type }?.key ?? String(type)
                c["expected_rcode"] = rcodes.map(DNSQuery.rcodeName)
            }
            entry["health_check"] = c
        }
        if let detection = outlierDetection {
            entry["outlier_detection"] = [
                "consecutive_failures": detection.consecutiveFailures, "ejection_time": detection.ejectionTime.description,
                "max_ejection_time": detection.maxEjectionTime.description, "max_ejection_percent": detection.maxEjectionPercent,
            ]
        }
        return entry
    }
}
