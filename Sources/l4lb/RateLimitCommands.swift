import ArgumentParser
import Foundation

/// `l4lb ratelimit top`: the sources `rate_limit` held back most in the last minute.
struct RateLimit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ratelimit", abstract: "Inspect per-source rate limiting of a running l4lb.", subcommands: [Top.self])

    struct Top: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the sources most limited in the last minute.")
        @OptionGroup var adminOptions: AdminOptions

        @Option(help: "How many sources to list (1-1000).")
        var limit = 20

        @Flag(help: "Print the admin API's JSON as it is.")
        var json = false

        func run() async throws {
            try await runAdmin {
                let (status, body) = try await AdminClient(adminOptions).request("GET", "/ratelimit/top?limit=\(limit)")
                guard status == 200 else {
                    throw AdminClient.Failure(description: "GET /ratelimit/top answered \(status): \(String(decoding: body, as: UTF8.self))")
                }
                if json {
                    FileHandle.standardOutput.write(body)
                    return
                }
                let document = AdminClient.object(body)
                let sources = document["sources"] as? [[String: Any]] ?? []
                if sources.isEmpty {
                    print("no source was limited in the last minute")
                } else {
                    let rows = sources.map { s in
                        ["\(s["source"] ?? "?")", "\(s["listener"] ?? "?")", "\(s["limited_last_minute"] ?? 0)",
                         (s["reasons"] as? [String] ?? []).joined(separator: ","), "\(s["connections"] ?? 0)"]
                    }
                    let header = ["SOURCE", "LISTENER", "LIMITED/MIN", "REASONS", "OPEN"]
                    let widths = (0..<header.count).map { c in ([header] + rows).map { $0[c].count }.max() ?? 0 }
                    for row in [header] + rows {
                        print(row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  "))
                    }
                }
                if let table = document["table"] as? [String: Any] {
                    print("table: \(table["slots_used"] ?? 0) of \(table["table_size"] ?? 0) slots used, \(table["evictions"] ?? 0) evictions, \(table["untracked"] ?? 0) untracked")
                }
            }
        }
    }
}
