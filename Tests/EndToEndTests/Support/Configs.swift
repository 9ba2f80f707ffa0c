/// Builds l4lb YAML for tests: one listener in front of one cluster.
func proxyConfig(
    listen: String, endpoints: [String], weights: [Int]? = nil, workers: Int = 2,
    listenerExtra: [String] = [], drainTimeout: String = "30s"
) -> String {
    var lines = [
        "workers: \(workers)",
        "drain_timeout: \(drainTimeout)",
        "listeners:",
        "  - name: test",
        "    address: \(listen)",
        "    cluster: backends",
    ]
    lines += listenerExtra.map { "    " + $0 }
    lines += ["clusters:", "  - name: backends", "    endpoints:"]
    for (i, endpoint) in endpoints.enumerated() {
        lines.append("      - { address: \(endpoint), weight: \(weights?[i] ?? 1) }")
    }
    return lines.joined(separator: "\n") + "\n"
}
