import Atomics
import Foundation

/// The `/stats` document: totals across workers, read with relaxed loads of the workers'
/// counters (never a lock on the data path). Listeners and endpoints are those of the
/// running config, plus removed ones that still have open connections.
extension WorkerPool {
    public func statsDocument() -> [String: Any] {
        let snapshot = store.snapshot
        let stats = controls.map(\.stats)
        func signed(_ value: UInt64) -> Int { Int(Int64(bitPattern: value)) }

        func listenerEntry(id: Int, name: String, address: String?, removed: Bool) -> [String: Any] {
            func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: id) }
            var entry: [String: Any] = ["name": name]
            for c in ExportedCounters.listener { entry[c.key] = c.isGauge ? signed(total(c.counter)) : total(c.counter) }
            if let address { entry["address"] = address }
            if removed { entry["removed"] = true }
            return entry
        }
        var listeners = snapshot.listeners.map {
            var entry = listenerEntry(id: $0.id, name: $0.name, address: $0.address.description, removed: false)
            entry["protocol"] = $0.transport.rawValue
            if $0.transport == .udp {
                // Sessions: `active` and `total` above, `idle_timeouts` the expired ones.
                entry["datagrams_in"] = stats.total(.datagramsIn, listener: $0.id)
                entry["datagrams_out"] = stats.total(.datagramsOut, listener: $0.id)
                var drops: [String: UInt64] = [:]
                for (counter, reason) in WorkerStats.ListenerCounter.datagramDropReasons { drops[reason] = stats.total(counter, listener: $0.id) }
                // Datagrams the kernel dropped because a listener socket's queue was full.
                drops["receive_queue"] = receiveQueueDrops(listener: $0.id)
                entry["datagram_drops"] = drops.values.reduce(0, +)
                entry["datagram_drops_by_reason"] = drops
                entry["sessions_evicted"] = stats.total(.sessionsEvicted, listener: $0.id)
                entry["max_sessions"] = $0.maxSessions
                entry["relay"] = $0.relay.rawValue
                if $0.relay == .kernel {
                    // What the kernel carried is in datagrams_in/out too (folded in once a second).
                    entry["kernel_relay"] = [
                        "sessions": stats.total(.kernelSessions, listener: $0.id),
                        "datagrams_in": stats.total(.kernelDatagramsIn, listener: $0.id),
                        "datagrams_out": stats.total(.kernelDatagramsOut, listener: $0.id),
                        "fallbacks": stats.total(.kernelFallbacks, listener: $0.id),
                    ]
                }
            }
            if let tls = $0.tls { entry["tls"] = tlsEntry(listener: $0.id, tls, stats: stats) }
            if !$0.routes.isEmpty { entry["sni"] = sniEntry($0, snapshot: snapshot, stats: stats) }
            if snapshot.reachesUpstreamTLS($0) { entry["upstream_tls"] = upstreamTLSEntry(listener: $0.id, stats: stats) }
            entry["max_connections"] = $0.maxConnections.map { $0 as Any } ?? NSNull()
            if let limit = $0.rateLimit { entry["rate_limit"] = rateLimitEntry($0, limit, stats: stats) }
            if $0.transport == .tcp, $0.forwardedInKernel, let forwarder = kernelForwarder {
                entry["kernel_relay"] = kernelTrafficEntry(forwarder.traffic(listener: $0.id), listener: $0.id)
            }
            return entry
        }
        for (id, name) in removedListenersWithConnections(snapshot) {
            listeners.append(listenerEntry(id: id, name: name, address: nil, removed: true))
        }

        func endpointEntry(id: Int, address: SocketAddress, weight: Int?, removed: Bool) -> [String: Any] {
            func total(_ c: WorkerStats.EndpointCounter) -> UInt64 { stats.total(c, endpoint: id) }
            let flags = status.flags(id)
            var entry: [String: Any] = [
                "address": address.description,
                "healthy": !flags.contains(.unhealthy),
                "ejected": flags.contains(.ejected),
                "draining": flags.contains(.draining),
                "outlier_ejections": healthChecker.ejectionCount(endpoint: id),
                "health_transitions": healthChecker.transitionCount(endpoint: id),
            ]
            for c in ExportedCounters.endpoint { entry[c.key] = c.isGauge ? signed(total(c.counter)) : total(c.counter) }
            if let weight { entry["weight"] = weight }
            if removed { entry["removed"] = true }
            if flags.contains(.markedUnhealthy) { entry["control_plane"] = "unhealthy" }
            if flags.contains(.markedDraining) { entry["control_plane"] = "draining" }
            if let traffic = kernelForwarder?.traffic(endpoint: id) { entry["kernel_relay"] = kernelTrafficEntry(traffic, listener: nil) }
            return entry
        }
        var clusters: [[String: Any]] = []
        var clusterPositions: [String: Int] = [:]
        for cluster in snapshot.clusters {
            clusterPositions[cluster.name] = clusters.count
            let endpoints = (cluster.firstEndpoint..<(cluster.firstEndpoint + cluster.endpointCount)).map { position in
                let endpoint = snapshot.endpoints[position]
                return endpointEntry(id: endpoint.id, address: endpoint.address, weight: endpoint.weight, removed: false)
            }
            clusters.append(["name": cluster.name, "balancer": cluster.balancer.rawValue, "endpoints": endpoints])
        }
        // A dns: cluster says how its source stands (`/discovery` has the rest).
        for source in dnsDiscovery.snapshot {
            guard let position = clusterPositions[source.cluster] else { continue }
            clusters[position]["dns"] = [
                "name": source.settings.name, "state": source.state, "last_error": source.lastError ?? NSNull(),
                "updates": source.updates, "failures": source.failures,
            ] as [String: Any]
        }
        for (id, key) in removedEndpointsWithConnections(snapshot) {
            let entry = endpointEntry(id: id, address: key.address, weight: nil, removed: true)
            if let position = clusterPositions[key.cluster] {
                clusters[position]["endpoints"] = (clusters[position]["endpoints"] as? [[String: Any]] ?? []) + [entry]
            } else {
                clusterPositions[key.cluster] = clusters.count
                clusters.append(["name": key.cluster, "removed": true, "endpoints": [entry]])
            }
        }

        let workers = controls.map { control -> [String: Any] in
            let s = control.stats
            var entry: [String: Any] = [
                "index": control.index,
                "cpu": control.cpu.map { $0 as Any } ?? NSNull(),
                "generation": s.value(.adoptedGeneration),
                "plans": s.value(.livePlans),
                "oldest_plan_generation": s.value(.oldestPlanGeneration),
                "small_buffers_peak": s.value(.smallBuffersPeak),
                "large_buffers_peak": s.value(.largeBuffersPeak),
                "small_buffers_in_use": s.value(.smallBuffersInUse),
                "large_buffers_in_use": s.value(.largeBuffersInUse),
            ]
            for c in ExportedCounters.worker { entry[c.key] = s.value(c.counter) }
            return entry
        }
        var reloadEntry: [String: Any] = ["succeeded": reloads.succeeded, "failed": reloads.failed]
        let accessLogEntry: Any = accessLogTotals.map { ["written": $0.written, "dropped": $0.dropped] } ?? NSNull()
        if let last = reloads.last { reloadEntry["last"] = last.document }
        return [
            "generation": snapshot.generation,
            "listeners": listeners,
            "clusters": clusters,
            "workers": workers,
            "reloads": reloadEntry,
            "access_log": accessLogEntry,
            "filter": filterDocument(),
            "rate_limit": rateLimitTableDocument(),
            "kernel_relay": kernelRelayDocument(),
            "health_checks_not_run": healthChecker.localFailures.load(ordering: .relaxed),
            "relay_state_violations": RelayChecks.violations.load(ordering: .relaxed),
        ]
    }
}

extension ReloadOutcome {
    public var document: [String: Any] {
        [
            "succeeded": succeeded,
            "generation": generation,
            "errors": errors,
            "changes": changes,
            "trigger": trigger,
            "finished_at": ISO8601DateFormatter().string(from: finishedAt),
            "milliseconds": milliseconds,
        ]
    }
}
