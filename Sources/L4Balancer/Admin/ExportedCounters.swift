/// A counter as `/stats` and `/metrics` both show it: its key in the `/stats` document,
/// its Prometheus name and help. Both render from the lists below, so a counter added to
/// a list appears in both, under names that cannot drift apart.
struct ExportedCounter<Counter: Sendable>: Sendable {
    let counter: Counter
    let key: String
    let metric: String
    let help: String
    /// A level, not a running total (connections open now): a gauge, read as signed.
    var isGauge = false
}

enum ExportedCounters {
    /// Per listener, the counters every listener has (TLS, SNI, UDP and rate-limit
    /// counters, shown only for listeners that use them, are rendered with their labels).
    static let listener: [ExportedCounter<WorkerStats.ListenerCounter>] = [
        .init(counter: .active, key: "active", metric: "l4lb_listener_connections_active",
              help: "Connections open now (connecting or proxying).", isGauge: true),
        .init(counter: .accepted, key: "total", metric: "l4lb_listener_connections_total", help: "Connections accepted."),
        .init(counter: .refused, key: "refused", metric: "l4lb_listener_connections_refused_total",
              help: "Connections closed at accept: limits, draining, no slot."),
        .init(counter: .bytesIn, key: "bytes_in", metric: "l4lb_listener_received_bytes_total", help: "Bytes received from clients."),
        .init(counter: .bytesOut, key: "bytes_out", metric: "l4lb_listener_sent_bytes_total", help: "Bytes sent to clients."),
        .init(counter: .connectFailed, key: "connect_failed", metric: "l4lb_listener_connect_failures_total",
              help: "Connections closed because no upstream connect succeeded."),
        .init(counter: .idleTimeouts, key: "idle_timeouts", metric: "l4lb_listener_idle_timeouts_total", help: "Connections closed by idle_timeout."),
        .init(counter: .sendTimeouts, key: "send_timeouts", metric: "l4lb_listener_send_timeouts_total",
              help: "Connections reset by send_timeout (a peer accepted nothing)."),
        .init(counter: .drainTimeouts, key: "drain_timeouts", metric: "l4lb_listener_drain_timeouts_total",
              help: "Connections closed drain_timeout after a reload removed their listener."),
        .init(counter: .acceptErrors, key: "accept_errors", metric: "l4lb_listener_accept_errors_total",
              help: "Accepts the kernel failed (EMFILE and the like)."),
        .init(counter: .clusterFull, key: "cluster_full", metric: "l4lb_circuit_breaker_rejections_total",
              help: "Connections refused because the cluster was at max_connections."),
        .init(counter: .closedUnhealthy, key: "closed_unhealthy", metric: "l4lb_listener_closed_unhealthy_total",
              help: "Connections closed because their endpoint turned unhealthy (on_unhealthy: close)."),
        .init(counter: .bufferWaits, key: "buffer_waits", metric: "l4lb_listener_buffer_waits_total",
              help: "Receives that found no free buffer and waited."),
    ]

    /// Per endpoint, its traffic counters (health and ejection state come from the checker).
    static let endpoint: [ExportedCounter<WorkerStats.EndpointCounter>] = [
        .init(counter: .active, key: "active", metric: "l4lb_endpoint_connections_active",
              help: "Upstream connections open now (connecting or connected).", isGauge: true),
        .init(counter: .total, key: "total", metric: "l4lb_endpoint_connections_total", help: "Upstream connections established."),
        .init(counter: .connectFailures, key: "connect_failures", metric: "l4lb_endpoint_connect_failures_total",
              help: "Upstream connect attempts that failed or timed out."),
        .init(counter: .connectTimeouts, key: "connect_timeouts", metric: "l4lb_endpoint_connect_timeouts_total",
              help: "Upstream connect attempts that hit connect_timeout (also in connect_failures)."),
        .init(counter: .bytesIn, key: "bytes_in", metric: "l4lb_endpoint_received_bytes_total", help: "Bytes received from the endpoint."),
        .init(counter: .bytesOut, key: "bytes_out", metric: "l4lb_endpoint_sent_bytes_total", help: "Bytes sent to the endpoint."),
    ]

    /// Per worker, the event loop's counters (buffer levels are rendered by size).
    static let worker: [ExportedCounter<WorkerStats.WorkerCounter>] = [
        .init(counter: .iterations, key: "iterations", metric: "l4lb_worker_loop_iterations_total",
              help: "Event-loop iterations (one ring wait each)."),
        .init(counter: .submissionDrops, key: "submission_drops", metric: "l4lb_worker_submission_drops_total",
              help: "Requests dropped because the submission queue stayed full."),
        .init(counter: .waitErrors, key: "wait_errors", metric: "l4lb_worker_wait_errors_total", help: "Ring waits the kernel failed."),
        .init(counter: .accessLogDrops, key: "access_log_drops", metric: "l4lb_worker_access_log_drops_total",
              help: "Access-log lines dropped because the writer was behind."),
    ]
}
