import ArgumentParser
import Foundation

/// `l4lb block add|remove|list`: the running blocklist (DESIGN §6). Entries added here are
/// kept across reloads and, with the XDP maps pinned, across restarts.
struct Block: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change or show the running blocklist (source CIDRs, tcp/PORT, udp/PORT).",
        subcommands: [Add.self, Remove.self, List.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Block a source (CIDR, or a bare IP) or a destination port (tcp/PORT, udp/PORT).")
        @OptionGroup var adminOptions: AdminOptions
        @Argument(help: "192.0.2.0/24, 2001:db8::/32, 192.0.2.7, tcp/23 or udp/19.")
        var entry: String

        func run() async throws {
            try await change("POST", entry, adminOptions, done: "blocked")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove an entry added at run time (config entries stay until the config changes).")
        @OptionGroup var adminOptions: AdminOptions
        @Argument(help: "The entry, as it was added.")
        var entry: String

        func run() async throws {
            try await change("DELETE", entry, adminOptions, done: "unblocked")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show every entry and where it came from (config, runtime).")
        @OptionGroup var adminOptions: AdminOptions
        @Flag(help: "Print the admin API's JSON as it is.")
        var json = false

        func run() async throws {
            try await runAdmin {
                let (status, body) = try await AdminClient(adminOptions).request("GET", "/blocklist")
                guard status == 200 else { throw AdminClient.Failure(description: "GET /blocklist answered \(status): \(String(decoding: body, as: UTF8.self))") }
                if json {
                    FileHandle.standardOutput.write(body)
                    return
                }
                let document = AdminClient.object(body)
                var rows: [[String]] = []
                for (list, key) in [("blocked", "blocked"), ("allowed", "allowed")] {
                    for item in document[key] as? [[String: Any]] ?? [] {
                        rows.append([item["entry"] as? String ?? "?", list, (item["origin"] as? [String] ?? []).joined(separator: ",")])
                    }
                }
                print(StatsTable.table(["ENTRY", "LIST", "ORIGIN"], rows), terminator: "")
            }
        }
    }

    static func change(_ method: String, _ entry: String, _ options: AdminOptions, done: String) async throws {
        try await runAdmin {
            let (status, body) = try await AdminClient(options).request(method, "/blocklist", json: ["entry": entry])
            let outcome = AdminClient.object(body)
            guard status == 200 else {
                throw AdminClient.Failure(description: outcome["error"] as? String ?? String(decoding: body, as: UTF8.self))
            }
            print("\(done) \(outcome["entry"] as? String ?? entry)")
        }
    }
}
