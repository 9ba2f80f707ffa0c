import ArgumentParser
import Foundation

struct Stats: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show listeners, endpoints and workers of a running l4lb.")
    @OptionGroup var adminOptions: AdminOptions

    @Flag(help: "Print the admin API's JSON as it is.")
    var json = false

    func run() async throws {
        try await runAdmin {
            let (status, body) = try await AdminClient(adminOptions).request("GET", "/stats")
            guard status == 200 else { throw AdminClient.Failure(description: "GET /stats answered \(status): \(String(decoding: body, as: UTF8.self))") }
            if json {
                FileHandle.standardOutput.write(body)
            } else {
                print(StatsTable.render(AdminClient.object(body)), terminator: "")
            }
        }
    }
}

struct Discovery: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show where a running l4lb takes endpoints from (DNS, xDS) and what each source last answered.")
    @OptionGroup var adminOptions: AdminOptions

    func run() async throws {
        try await runAdmin {
            let (status, body) = try await AdminClient(adminOptions).request("GET", "/discovery")
            guard status == 200 else { throw AdminClient.Failure(description: "GET /discovery answered \(status): \(String(decoding: body, as: UTF8.self))") }
            let document = AdminClient.object(body)
            let sources = document["dns"] as? [[String: Any]] ?? []
            if let xds = document["xds"] as? [String: Any] { printXDS(xds) }
            if sources.isEmpty, document["xds"] == nil { print("no cluster takes its endpoints from DNS or xDS") }
            for source in sources {
                let endpoints = (source["endpoints"] as? [[String: Any]] ?? []).compactMap { $0["address"] as? String }
                print("cluster \(source["cluster"] ?? "?"): dns \(source["name"] ?? "?") \(source["type"] ?? "?"), \(source["state"] ?? "?"), "
                    + "\(endpoints.count) endpoints, ttl \(source["ttl"] as? Int ?? 0) s, next in \(source["next_resolution_ms"] as? Int ?? 0) ms")
                if !endpoints.isEmpty { print("  " + endpoints.joined(separator: " ")) }
                if let error = source["last_error"] as? String { print("  last error: \(error) at \(source["last_error_at"] as? String ?? "?")") }
            }
        }
    }
}

/// The xDS source of `l4lb discovery`: the stream, then CDS and EDS.
func printXDS(_ xds: [String: Any]) {
    let connected = xds["connected"] as? Bool == true
    print("xds \(xds["server"] ?? "?") as node \(xds["node_id"] ?? "?"): \(connected ? "connected" : "not connected"), \(xds["streams"] ?? 0) streams opened")
    if let error = xds["last_error"] as? String { print("  last error: \(error) at \(xds["last_error_at"] as? String ?? "?")") }
    for (label, key) in [("CDS", "clusters"), ("EDS", "endpoints")] {
        guard let s = xds[key] as? [String: Any] else { continue }
        let names = (s["resource_names"] as? [String] ?? []).joined(separator: " ")
        print("  \(label): version \(s["version"] ?? "") (nonce \(s["nonce"] ?? "")), \(s["resources"] ?? 0) resources, "
            + "\(s["accepted"] ?? 0) accepted, \(s["rejected"] ?? 0) rejected" + (names.isEmpty ? "" : ": \(names)"))
        if let nack = s["last_nack"] as? [String: Any] {
            print("    last NACK: version \(nack["version"] ?? "?") at \(nack["at"] ?? "?"): \(nack["error"] ?? "")")
        }
    }
    for (cluster, fields) in (xds["ignored"] as? [String: [String]] ?? [:]).sorted(by: { $0.key < $1.key }) {
        print("  cluster \(cluster) ignores: \(fields.joined(separator: ", "))")
    }
}

struct Reload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Make a running l4lb re-read its config file.")
    @OptionGroup var adminOptions: AdminOptions

    func run() async throws {
        try await runAdmin {
            let (status, body) = try await AdminClient(adminOptions).request("POST", "/reload")
            let outcome = AdminClient.object(body)
            if status == 200 {
                let changes = outcome["changes"] as? [String] ?? []
                print("reloaded: generation \(outcome["generation"] ?? "?")" + (changes.isEmpty ? ", nothing changed" : ""))
                for change in changes { print("  \(change)") }
                return
            }
            let errors = outcome["errors"] as? [String] ?? [String(decoding: body, as: UTF8.self)]
            FileHandle.standardError.write(Data("reload failed; the running config is unchanged:\n".utf8))
            for error in errors { FileHandle.standardError.write(Data("\(error)\n".utf8)) }
            throw ExitCode(2)
        }
    }
}

struct Drain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop new connections to one endpoint (its open ones finish), or resume them with --undo.")
    @OptionGroup var adminOptions: AdminOptions

    @Argument(help: "The cluster's name.")
    var cluster: String

    @Argument(help: "The endpoint's address as in the config (ip:port or [v6]:port).")
    var address: String

    @Flag(help: "Resume new connections to the endpoint.")
    var undo = false

    func run() async throws {
        try await runAdmin {
            let encoded = address.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? address
            let name = cluster.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? cluster
            let (status, body) = try await AdminClient(adminOptions).request(undo ? "DELETE" : "POST", "/clusters/\(name)/endpoints/\(encoded)/drain")
            guard status == 200 else {
                let message = AdminClient.object(body)["error"] as? String ?? String(decoding: body, as: UTF8.self)
                throw AdminClient.Failure(description: message)
            }
            print(undo ? "\(cluster) \(address): taking new connections again" : "\(cluster) \(address): draining (no new connections; open ones finish)")
        }
    }
}

/// `l4lb stats` without `--json`: aligned tables.
enum StatsTable {
    static func render(_ stats: [String: Any]) -> String {
        var out = "generation \(stats["generation"] ?? "?")"
        if let reloads = stats["reloads"] as? [String: Any] {
            out += ", reloads: \(reloads["succeeded"] ?? 0) ok, \(reloads["failed"] ?? 0) failed"
        }
        out += "\n\n"
        let listeners = (stats["listeners"] as? [[String: Any]] ?? []).map { l in
            [l["name"], l["address"] ?? "(removed)", l["active"], l["total"], l["refused"], l["bytes_in"], l["bytes_out"]].map(text)
        }
        out += table(["LISTENER", "ADDRESS", "ACTIVE", "TOTAL", "REFUSED", "BYTES IN", "BYTES OUT"], listeners) + "\n"
        var endpoints: [[String]] = []
        for cluster in stats["clusters"] as? [[String: Any]] ?? [] {
            for e in cluster["endpoints"] as? [[String: Any]] ?? [] {
                var state: [String] = []
                if e["healthy"] as? Bool == false { state.append("unhealthy") }
                if e["ejected"] as? Bool == true { state.append("ejected") }
                if e["draining"] as? Bool == true { state.append("draining") }
                if e["removed"] as? Bool == true { state.append("removed") }
                endpoints.append([cluster["name"], e["address"], state.isEmpty ? "healthy" : state.joined(separator: ","), e["weight"] ?? "-",
                                  e["active"], e["total"], e["connect_failures"], e["bytes_in"], e["bytes_out"]].map(text))
            }
        }
        out += table(["CLUSTER", "ENDPOINT", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "CONNECT FAILS", "BYTES IN", "BYTES OUT"], endpoints) + "\n"
        let workers = (stats["workers"] as? [[String: Any]] ?? []).map { w in
            [w["index"], w["cpu"], w["generation"], w["plans"], w["small_buffers_peak"], w["large_buffers_peak"]].map(text)
        }
        out += table(["WORKER", "CPU", "GENERATION", "PLANS", "SMALL BUF PEAK", "LARGE BUF PEAK"], workers)
        if let filter = stats["filter"] as? [String: Any] {
            let interfaces = (filter["interfaces"] as? [[String: Any]] ?? []).map { "\(text($0["name"])) (\(text($0["mode"])))" }
            out += "\nfilter: \(text(filter["mode"]))" + (interfaces.isEmpty ? "" : " on \(interfaces.joined(separator: ", "))")
                + ", \(text(filter["blocked_entries"])) blocked, \(text(filter["allowed_entries"])) allowed"
                + (filter["fallback_reason"].map { " (XDP unavailable: \(text($0)))" } ?? "") + "\n"
            var rows: [[String]] = []
            for row in filter["counters"] as? [[String: Any]] ?? [] {
                for (reason, count) in (row["dropped"] as? [String: Any] ?? [:]).sorted(by: { $0.key < $1.key }) {
                    rows.append([text(row["interface"]), text(row["mode"]), reason, text(count)])
                }
            }
            if !rows.isEmpty { out += table(["INTERFACE", "MODE", "DROPPED BECAUSE", "COUNT"], rows) }
        }
        return out
    }

    static func text(_ value: Any?) -> String {
        switch value {
        case nil, is NSNull: return "-"
        case let v?: return "\(v)"
        }
    }

    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces) + "\n"
        }
        return line(header) + rows.map(line).joined()
    }
}
