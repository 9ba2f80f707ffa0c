import Foundation
import Yams

/// `admin:` — the admin API's address, bearer token, the names it answers to, and its own
/// connection budget.
extension ConfigWalker {
    /// A token file is read here, so a reload picks up a rotated token; an address off
    /// loopback without a token is refused.
    mutating func admin(_ node: Node, _ path: String) -> Config.Admin {
        var admin = Config.Admin()
        guard let fields = mapping(node, path, keys: [
            "address", "token", "token_file", "allowed_hosts", "max_connections", "idle_timeout", "request_timeout",
        ]) else { return admin }
        if let n = fields["address"], let a = address(n, "\(path).address") { admin.address = a }
        if let n = fields["token"], let token = string(n, "\(path).token") {
            if token.isEmpty { fail("\(path).token", "must not be empty") } else { admin.token = token }
        }
        if let n = fields["token_file"], let file = string(n, "\(path).token_file") {
            if fields["token"] != nil {
                fail("\(path).token_file", "set token or token_file, not both")
            } else if let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8) {
                let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
                if token.isEmpty {
                    fail("\(path).token_file", "\(file) is empty")
                } else if let bad = token.firstControlCharacter {
                    fail("\(path).token_file", "\(file) holds a control character (\(bad)) inside the token")
                } else {
                    admin.token = token
                }
            } else {
                fail("\(path).token_file", "cannot read \(file)")
            }
        }
        if admin.token == nil, !admin.address.isLoopback, fields["token_file"] == nil {
            fail("\(path).address", "\(admin.address) is not a loopback address: set admin.token or admin.token_file, or anyone who can reach it can reload and drain l4lb")
        }
        if let n = fields["allowed_hosts"] {
            let names = list(n, "\(path).allowed_hosts", required: false) { walker, item, itemPath -> String? in
                guard let name = walker.string(item, itemPath) else { return nil }
                let valid = !name.isEmpty && name.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: ":") && $0 != UInt8(ascii: "/") }
                guard valid else {
                    walker.fail(itemPath, "expected a host name such as lb.example.com, got \(name.debugDescription)")
                    return nil
                }
                return name.lowercased()
            }
            admin.allowedHosts = Set(names)
        }
        if let n = fields["max_connections"], let v = int(n, "\(path).max_connections", 1...4096) { admin.maxConnections = v }
        for (key, field) in [("idle_timeout", \Config.Admin.idleTimeout), ("request_timeout", \Config.Admin.requestTimeout)] {
            guard let n = fields[key], let d = duration(n, "\(path).\(key)") else { continue }
            if d.milliseconds < 100 || d > .seconds(3600) { fail("\(path).\(key)", "\(d) out of range 100ms...1h") } else { admin[keyPath: field] = d }
        }
        return admin
    }
}
