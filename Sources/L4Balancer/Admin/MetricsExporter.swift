import Atomics
import BPFSteer
import Foundation
import Prometheus

/// `GET /metrics`: the Prometheus text format, built with swift-prometheus from the same
/// per-worker counters `/stats` reads (relaxed loads; no lock on the data path). Each
/// scrape sets every series to its current total across workers. Totals are kept by
/// identity, so they stay monotonic across reloads; a listener or endpoint a reload
/// removed keeps its series while it still has connections, then drops out.
public final class MetricsExporter: @unchecked Sendable {
    let pool: WorkerPool
    private let lock = NSLock()
    private let registry = PrometheusCollectorRegistry()
    private var counters: [String: Counter] = [:]
    private var gauges: [String: Gauge] = [:]
    private var seen = Set<String>()
    /// This scrape's handshake-duration histograms: swift-prometheus's `Histogram` only
    /// records observations, and these are counted by the workers already, so their text
    /// is written here, after the registry's.
    private var histograms: [(labels: [(String, String)], buckets: [(le: String, count: UInt64)], sumMilliseconds: UInt64)] = []

    public init(pool: WorkerPool) {
        self.pool = pool
    }

    /// One scrape's worth of text.
    public func scrape() -> [UInt8] {
        lock.withLock {
            seen.removeAll(keepingCapacity: true)
            histograms.removeAll(keepingCapacity: true)
            collect()
            // Series of identities that have gone away.
            for (key, counter) in counters where !seen.contains(key) {
                registry.unregisterCounter(counter)
                counters[key] = nil
            }
            for (key, gauge) in gauges where !seen.contains(key) {
                registry.unregisterGauge(gauge)
                gauges[key] = nil
            }
            return registry.emitToBuffer() + histogramText()
        }
    }

    private func histogramText() -> [UInt8] {
        guard !histograms.isEmpty else { return [] }
        let name = "l4lb_tls_handshake_duration_seconds"
        var text = "# HELP \(name) Completed TLS handshakes by duration, accept to Finished.\n# TYPE \(name) histogram\n"
        for h in histograms {
            let labels = h.labels.map { "\($0.0)=\"\(MetricsExporter.escape($0.1))\"" }.joined(separator: ",")
            for bucket in h.buckets {
                let le = bucket.le == "+Inf" ? "+Inf" : "\(Double(bucket.le)! / 1000)"
                text += "\(name)_bucket{\(labels),le=\"\(le)\"} \(bucket.count)\n"
            }
            text += "\(name)_sum{\(labels)} \(Double(h.sumMilliseconds) / 1000)\n"
            text += "\(name)_count{\(labels)} \(h.buckets.last?.count ?? 0)\n"
        }
        return Array(text.utf8)
    }

    /// A label value in the text format: backslash, quote and newline escaped.
    static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }

    private func key(_ name: String, _ labels: [(String, String)]) -> String {
        ([name] + labels.map { "\($0.0)=\($0.1)" }).joined(separator: "\u{1F}")
    }

    private func counter(_ name: String, _ help: String, _ labels: [(String, String)], _ value: UInt64) {
        let k = key(name, labels)
        seen.insert(k)
        let counter = counters[k] ?? registry.makeCounter(name: name, labels: labels, help: help)
        counters[k] = counter
        counter.reset()
        counter.increment(by: Int64(clamping: value))
    }

    private func gauge(_ name: String, _ help: String, _ labels: [(String, String)], _ value: Double) {
        let k = key(name, labels)
        seen.insert(k)
        let gauge = gauges[k] ?? registry.makeGauge(name: name, labels: labels, help: help)
        gauges[k] = gauge
        gauge.set(to: value)
    }

    /// Renders `counters` (the list `/stats` renders too) with `labels`.
    private func export<Counter>(_ counters: [ExportedCounter<Counter>], _ labels: [(String, String)], _ value: (Counter) -> UInt64) {
        for c in counters {
            if c.isGauge {
                gauge(c.metric, c.help, labels, Double(Int64(bitPattern: value(c.counter))))
            } else {
                counter(c.metric, c.help, labels, value(c.counter))
            }
        }
    }

    private func collect() {
        let snapshot = pool.store.snapshot
        let stats = pool.controls.map(\.stats)

        // Listeners: the running ones, and removed ones with connections still open.
        let listeners = snapshot.listeners.map { (id: $0.id, name: $0.name) } + pool.removedListenersWithConnections(snapshot)
        // UDP listeners: connections_active/total and idle_timeouts count their sessions.
        let udpListeners = Set(snapshot.listeners.filter { $0.transport == .udp }.map(\.id))
        var tlsListeners: [Int: Config.TLS] = [:]
        for listener in snapshot.listeners { if let tls = listener.tls { tlsListeners[listener.id] = tls } }
        let rateLimitedListeners = Dictionary(snapshot.listeners.filter { $0.rateLimit != nil }.map { ($0.id, $0) }) { a, _ in a }
        let routedListeners = Set(snapshot.listeners.filter { !$0.routes.isEmpty }.map(\.id))
        let upstreamTLSListeners = Set(snapshot.listeners.filter { snapshot.reachesUpstreamTLS($0) }.map(\.id))
        let kernelListeners = Set(snapshot.listeners.filter { $0.transport == .tcp && $0.forwardedInKernel }.map(\.id))
        for listener in listeners {
            let labels = [("listener", listener.name)]
            func total(_ c: WorkerStats.ListenerCounter) -> UInt64 { stats.total(c, listener: listener.id) }
            export(ExportedCounters.listener, labels, total)
            if let tls = tlsListeners[listener.id] {
                let help = "TLS handshakes, by result (ok by version, failed, timeout)."
                counter("l4lb_tls_handshakes_total", help, labels + [("result", "ok"), ("version", "1.2")], total(.tlsHandshakes12))
                counter("l4lb_tls_handshakes_total", help, labels + [("result", "ok"), ("version", "1.3")], total(.tlsHandshakes13))
                counter("l4lb_tls_handshakes_total", help, labels + [("result", "ok"), ("version", "other")], total(.tlsHandshakesOther))
                counter("l4lb_tls_handshakes_total", help, labels + [("result", "failed"), ("version", "")], total(.tlsHandshakeFailures))
                counter("l4lb_tls_handshakes_total", help, labels + [("result", "timeout"), ("version", "")], total(.tlsHandshakeTimeouts))
                counter("l4lb_tls_resumptions_total", "TLS handshakes that resumed a session (ticket or cache).", labels, total(.tlsResumed))
                counter("l4lb_tls_handshake_seconds_total", "Time spent in completed handshakes, accept to Finished (divide by handshakes).", labels,
                        total(.tlsHandshakeMilliseconds) / 1000)
                histograms.append((labels, pool.handshakeHistogram(listener: listener.id, stats: stats), total(.tlsHandshakeMilliseconds)))
                counter("l4lb_tls_errors_total", "Connections closed on a TLS error after the handshake.", labels, total(.tlsErrors))
                for (counter, reason) in WorkerStats.ListenerCounter.tlsClientFailureReasons {
                    self.counter("l4lb_tls_client_auth_failures_total", "Client-certificate (mTLS) failures, by reason.", labels + [("reason", reason)], total(counter))
                }
                for certificate in tls.certificates {
                    gauge("l4lb_tls_certificate_expiry_seconds", "A certificate's notAfter, seconds since the epoch.",
                          labels + [("certificate", certificate.certPath)], Double(certificate.notAfter))
                }
            }
            if upstreamTLSListeners.contains(listener.id) {
                let help = "TLS handshakes l4lb made with upstreams (clusters with tls:), by result."
                counter("l4lb_upstream_tls_handshakes_total", help, labels + [("result", "ok")], total(.tlsUpstreamHandshakes))
                counter("l4lb_upstream_tls_handshakes_total", help, labels + [("result", "failed")], total(.tlsUpstreamFailures))
                counter("l4lb_upstream_tls_resumptions_total", "Upstream TLS handshakes that resumed the endpoint's session.", labels, total(.tlsUpstreamResumed))
                counter("l4lb_upstream_tls_unverified_total", "Upstream handshakes failed because the endpoint's certificate did not verify.", labels,
                        total(.tlsUpstreamUnverified))
            }
            if routedListeners.contains(listener.id) {
                let help = "Connections by what their ClientHello's server name did: routed, default cluster, or closed (malformed, oversize, timeout)."
                for (c, outcome) in [(WorkerStats.ListenerCounter.sniRouted, "routed"), (.sniDefault, "default"), (.sniMalformed, "malformed"),
                                     (.sniOversize, "oversize"), (.sniTimeouts, "timeout")] {
                    counter("l4lb_sni_connections_total", help, labels + [("outcome", outcome)], total(c))
                }
                if let plan = snapshot.listeners.first(where: { $0.id == listener.id }) {
                    for (i, route) in plan.routes.enumerated() {
                        counter("l4lb_sni_route_hits_total", "Connections each route took, by its first server name and cluster.",
                                labels + [("route", route.serverNames.first ?? "\(i)"), ("cluster", snapshot.clusters[route.cluster].name)],
                                stats.routeHits(listener: listener.id, route: i))
                    }
                }
            }
            if let plan = rateLimitedListeners[listener.id] {
                let help = "Connections, UDP sessions or datagrams refused by rate_limit, by reason (in XDP or the workers)."
                let counts = pool.rateLimited(plan, stats: stats)
                for (reason, count) in counts.byReason {
                    counter("l4lb_rate_limited_total", help, labels + [("reason", reason.name)], count)
                }
                counter("l4lb_rate_limit_exempt_total", "New connections or sessions from exempt sources (never limited).", labels, counts.exempt)
                gauge("l4lb_rate_limit_in_xdp", "1 when XDP enforces the listener's new_connections and packets limits.", labels, plan.rateLimitInKernel ? 1 : 0)
            }
            if udpListeners.contains(listener.id) {
                let help = "UDP datagrams relayed, by direction (in: from clients)."
                counter("l4lb_listener_datagrams_total", help, labels + [("direction", "in")], total(.datagramsIn))
                counter("l4lb_listener_datagrams_total", help, labels + [("direction", "out")], total(.datagramsOut))
                let dropHelp = "UDP datagrams dropped, by reason (receive_queue: by the kernel, the listener socket's queue full)."
                for (drop, reason) in WorkerStats.ListenerCounter.datagramDropReasons {
                    counter("l4lb_listener_datagram_drops_total", dropHelp, labels + [("reason", reason)], total(drop))
                }
                counter("l4lb_listener_datagram_drops_total", dropHelp, labels + [("reason", "receive_queue")], pool.receiveQueueDrops(listener: listener.id))
                counter("l4lb_listener_sessions_evicted_total", "UDP sessions evicted by max_sessions (longest idle first).", labels, total(.sessionsEvicted))
                counter("l4lb_listener_kernel_relay_sessions_total", "UDP sessions handed to the kernel's relay (relay: kernel).", labels, total(.kernelSessions))
                let kernelHelp = "UDP datagrams the kernel's relay carried, by direction (also in l4lb_listener_datagrams_total)."
                counter("l4lb_listener_kernel_relay_datagrams_total", kernelHelp, labels + [("direction", "in")], total(.kernelDatagramsIn))
                counter("l4lb_listener_kernel_relay_datagrams_total", kernelHelp, labels + [("direction", "out")], total(.kernelDatagramsOut))
                counter("l4lb_listener_kernel_relay_fallbacks_total", "UDP sessions kept in user space: the kernel's flow table was full, or another worker held the client there.", labels, total(.kernelFallbacks))
            }
            if kernelListeners.contains(listener.id), let forwarder = pool.kernelForwarder {
                kernelTraffic(forwarder.traffic(listener: listener.id), "listener", labels)
                counter("l4lb_listener_kernel_closed_unhealthy_total", "Kernel flows removed because their endpoint turned unhealthy (on_unhealthy: close).",
                        labels, forwarder.closedUnhealthy(listener: listener.id))
            }
        }

        // Endpoints: the running config's, and removed ones with connections still open.
        let endpoints = snapshot.endpoints.map { (id: $0.id, cluster: snapshot.clusters[$0.cluster].name, address: $0.address) }
            + pool.removedEndpointsWithConnections(snapshot).map { (id: $0.id, cluster: $0.key.cluster, address: $0.key.address) }
        for endpoint in endpoints {
            let labels = [("cluster", endpoint.cluster), ("endpoint", endpoint.address.description)]
            func total(_ c: WorkerStats.EndpointCounter) -> UInt64 { stats.total(c, endpoint: endpoint.id) }
            let flags = pool.status.flags(endpoint.id)
            export(ExportedCounters.endpoint, labels, total)
            counter("l4lb_endpoint_outlier_ejections_total", "Times outlier detection ejected the endpoint.", labels,
                    UInt64(max(0, pool.healthChecker.ejectionCount(endpoint: endpoint.id))))
            gauge("l4lb_endpoint_healthy", "1 when the endpoint passes its health checks (or has none).", labels, flags.contains(.unhealthy) ? 0 : 1)
            gauge("l4lb_endpoint_ejected", "1 while outlier detection has ejected the endpoint.", labels, flags.contains(.ejected) ? 1 : 0)
            gauge("l4lb_endpoint_draining", "1 while the endpoint is drained.", labels, flags.contains(.draining) ? 1 : 0)
            counter("l4lb_endpoint_health_transitions_total", "Health and ejection changes (healthy <-> unhealthy, ejected <-> returned).", labels,
                    UInt64(max(0, pool.healthChecker.transitionCount(endpoint: endpoint.id))))
            if let traffic = pool.kernelForwarder?.traffic(endpoint: endpoint.id) { kernelTraffic(traffic, "endpoint", labels) }
        }
        if let forwarder = pool.kernelForwarder { kernelTotals(forwarder) }
        discovery()

        let table = pool.rateLimitTable
        gauge("l4lb_rate_limit_table_size", "Sources the rate-limit table can track at once (rate_limit.table_size).", [], Double(table.size))
        counter("l4lb_rate_limit_evictions_total", "Sources forgotten to make room in the rate-limit table.", [], table.evictions)
        counter("l4lb_rate_limit_untracked_total", "New sources let through unlimited because their part of the table was full of sources holding connections.", [], table.untracked)
        if let kernel = table.kernel {
            gauge("l4lb_rate_limit_xdp_sources", "Source prefixes the XDP program's rate-limit LRU holds now.", [], Double(kernel.buckets))
            counter("l4lb_rate_limit_xdp_evictions_total", "Sources (table=sources) and UDP flows (table=udp_flows) the XDP program's LRU maps forgot for room.",
                    [("table", "sources")], kernel.bucketEvictions)
            counter("l4lb_rate_limit_xdp_evictions_total", "Sources (table=sources) and UDP flows (table=udp_flows) the XDP program's LRU maps forgot for room.",
                    [("table", "udp_flows")], kernel.flowEvictions)
        }

        for control in pool.controls {
            let labels = [("worker", String(control.index))]
            let s = control.stats
            export(ExportedCounters.worker, labels) { s.value($0) }
            gauge("l4lb_worker_buffers_peak", "The most receive buffers of a size in use at once.", labels + [("size", "small")], Double(s.value(.smallBuffersPeak)))
            gauge("l4lb_worker_buffers_peak", "The most receive buffers of a size in use at once.", labels + [("size", "large")], Double(s.value(.largeBuffersPeak)))
            let buffers = pool.snapshot.config.buffers
            let inUse = "Receive buffers of a size in use now (sampled every 100 ms)."
            gauge("l4lb_worker_buffers_in_use", inUse, labels + [("size", "small")], Double(s.value(.smallBuffersInUse)))
            gauge("l4lb_worker_buffers_in_use", inUse, labels + [("size", "large")], Double(s.value(.largeBuffersInUse)))
            gauge("l4lb_worker_buffers", "Receive buffers of a size the worker has (buffers.small / buffers.large).", labels + [("size", "small")], Double(buffers.small))
            gauge("l4lb_worker_buffers", "Receive buffers of a size the worker has (buffers.small / buffers.large).", labels + [("size", "large")], Double(buffers.large))
            gauge("l4lb_worker_plans", "Plans alive: the current one and older ones with open connections.", labels, Double(s.value(.livePlans)))
            gauge("l4lb_worker_snapshot_generation", "The generation the worker opens new connections under.", labels, Double(s.value(.adoptedGeneration)))
        }
        counter("l4lb_relay_state_violations_total", "Relay transitions made outside the state table (a bug in l4lb; 0 expected).", [],
                UInt64(RelayChecks.violations.load(ordering: .relaxed)))
        if let lines = pool.accessLogTotals {
            let help = "Access-log lines by result: written, or dropped (writer behind or output refusing)."
            counter("l4lb_access_log_lines_total", help, [("result", "written")], UInt64(lines.written))
            counter("l4lb_access_log_lines_total", help, [("result", "dropped")], UInt64(lines.dropped))
        }
        // The filter: packets in XDP (per interface), connections in user space.
        for row in pool.filterCounts() {
            for reason in FilterReason.allCases {
                let labels = [("interface", row.interface), ("mode", row.mode), ("reason", reason.label)]
                if reason.drops {
                    counter("l4lb_filter_dropped_packets_total", "Packets (XDP) or connections (userspace) the filter dropped, by reason.", labels, row.counts[reason] ?? 0)
                } else {
                    counter("l4lb_filter_passed_packets_total", "Packets (XDP) or connections (userspace) the filter passed, by reason.", labels, row.counts[reason] ?? 0)
                }
            }
        }
        let lists = pool.filter.list()
        gauge("l4lb_filter_entries", "Blocklist entries by list.", [("list", "blocked")], Double(lists.blocked.count))
        gauge("l4lb_filter_entries", "Blocklist entries by list.", [("list", "allowed")], Double(lists.allowed.count))
        gauge("l4lb_snapshot_generation", "The running config's generation (1 at start, +1 per successful reload).", [], Double(snapshot.generation))
        counter("l4lb_reloads_total", "Reload attempts by result.", [("result", "success")], UInt64(pool.reloads.succeeded))
        counter("l4lb_reloads_total", "Reload attempts by result.", [("result", "failure")], UInt64(pool.reloads.failed))
    }

    /// A kernel listener's or endpoint's flows (`scope`: "listener" or "endpoint").
    private func kernelTraffic(_ traffic: (counts: KernelRelay.Traffic, active: Int), _ scope: String, _ labels: [(String, String)]) {
        let c = traffic.counts
        counter("l4lb_\(scope)_kernel_flows_total", "Flows the kernel forwarder started (relay: kernel).", labels, c.flows)
        gauge("l4lb_\(scope)_kernel_flows_active", "Kernel flows held at the forwarder's last sweep.", labels, Double(traffic.active))
        let packets = "Packets the kernel forwarder carried, by direction (in: the client's).", bytes = "TCP payload bytes the kernel forwarder carried, by direction, each once (retransmissions not counted again)."
        counter("l4lb_\(scope)_kernel_packets_total", packets, labels + [("direction", "in")], c.packetsIn)
        counter("l4lb_\(scope)_kernel_packets_total", packets, labels + [("direction", "out")], c.packetsOut)
        counter("l4lb_\(scope)_kernel_bytes_total", bytes, labels + [("direction", "in")], c.bytesIn)
        counter("l4lb_\(scope)_kernel_bytes_total", bytes, labels + [("direction", "out")], c.bytesOut)
        let connects = "The endpoints' answers to the kernel forwarder's SYNs (failure: a RST, an ICMP error, or none within connect_timeout)."
        counter("l4lb_\(scope)_kernel_connects_total", connects, labels + [("result", "success")], c.connectSuccesses)
        counter("l4lb_\(scope)_kernel_connects_total", connects, labels + [("result", "failure")], c.connectFailures)
        if scope == "listener" {
            counter("l4lb_listener_kernel_fallbacks_total", "SYNs the kernel forwarder left to the workers, who proxied them.", labels, c.fallbacks)
        }
    }

    /// The forwarder's whole-table counts.
    /// Each dns: cluster's source: answers that changed its endpoints, failed resolutions,
    /// and how long it has been failing (0 when its last resolution worked).
    private func discovery() {
        let now = monotonicMilliseconds()
        for source in pool.dnsDiscovery.snapshot {
            let labels = [("cluster", source.cluster), ("source", "dns")]
            counter("l4lb_discovery_updates_total", "Answers that changed a cluster's endpoints (or removed them after hold).", labels, source.updates)
            counter("l4lb_discovery_failures_total", "Resolutions that failed (timeout, SERVFAIL, NXDOMAIN, no records).", labels, source.failures)
            gauge("l4lb_discovery_stale_seconds", "How long the source has been failing while its last answer serves (0: fresh).", labels,
                  Double(source.failingSince.map { now - $0 } ?? 0) / 1000)
            gauge("l4lb_discovery_endpoints", "Endpoints the source gives its cluster now.", labels, Double(source.endpoints?.count ?? 0))
        }
        guard let client = pool.xdsClient else { return }
        let status = client.status
        for (type, s) in [("cds", status.clusters), ("eds", status.assignments)] {
            let labels = [("cluster", ""), ("source", "xds-\(type)")]
            counter("l4lb_discovery_updates_total", "Answers that changed a cluster's endpoints (or removed them after hold).", labels, s.accepted)
            counter("l4lb_discovery_failures_total", "Resolutions that failed (timeout, SERVFAIL, NXDOMAIN, no records).", labels, s.rejected)
        }
        let stale = status.disconnectedAt.map { Double(now - $0) / 1000 } ?? 0
        gauge("l4lb_discovery_stale_seconds", "How long the source has been failing while its last answer serves (0: fresh).",
              [("cluster", ""), ("source", "xds")], stale)
        gauge("l4lb_xds_connected", "1 while the stream to the xDS management server is up.", [], status.connected ? 1 : 0)
    }

    private func kernelTotals(_ forwarder: KernelForwarder) {
        let t = forwarder.relay.totals()
        let expiry = forwarder.expiry
        gauge("l4lb_kernel_relay_table_entries", "Entries in the kernel forwarder's flow table (two per flow) at its last sweep.", [], Double(expiry.tableEntries))
        gauge("l4lb_kernel_relay_table_capacity", "Flows the kernel forwarder's table holds (kernel_relay.flows).", [], Double(forwarder.settings.flows))
        counter("l4lb_kernel_relay_forwarded_packets_total", "Packets the kernel forwarder rewrote and redirected.", [], t.forwarded)
        counter("l4lb_kernel_relay_icmp_translated_total", "ICMP errors about kernel flows translated back to their sender.", [], t.icmpTranslated)
        counter("l4lb_kernel_relay_mss_clamped_total", "SYNs and SYN-ACKs whose MSS the kernel forwarder lowered.", [], t.mssClamped)
        counter("l4lb_kernel_relay_expired_total", "Kernel flows expired, by reason.", [("reason", "idle")], UInt64(expiry.idle))
        counter("l4lb_kernel_relay_expired_total", "Kernel flows expired, by reason.", [("reason", "closed")], UInt64(expiry.closed))
        counter("l4lb_kernel_relay_expired_total", "Kernel flows expired, by reason.", [("reason", "half_open")], UInt64(expiry.halfOpen))
        let fallbacks = "SYNs the kernel forwarder left to the workers, by reason."
        for (reason, value) in [("paused", t.fallbackPaused), ("no_endpoint", t.fallbackNoEndpoint), ("no_route", t.fallbackNoRoute),
                                ("no_port", t.fallbackNoPort), ("table_full", t.fallbackTableFull)] {
            counter("l4lb_kernel_relay_fallbacks_total", fallbacks, [("reason", reason)], value)
        }
        let drops = "Packets of kernel flows dropped, by reason."
        for (reason, value) in [("no_route", t.droppedNoRoute), ("forwarding_off", t.droppedForwardingOff), ("mtu", t.droppedMTU)] {
            counter("l4lb_kernel_relay_drops_total", drops, [("reason", reason)], value)
        }
    }
}
