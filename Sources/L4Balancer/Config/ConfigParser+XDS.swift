import Foundation
import Yams

/// The top-level `xds:` section (issue 36).
extension ConfigWalker {
    mutating func xds(_ node: Node, _ path: String) -> Config.XDS? {
        guard let fields = mapping(node, path, keys: ["server", "node_id", "node_cluster", "tls", "backoff", "max_backoff"]) else { return nil }
        var hostPort: (String, Int)?
        if let n = fields["server"], let text = string(n, "\(path).server") {
            hostPort = Self.hostAndPort(text)
            if hostPort == nil { fail("\(path).server", "expected host:port, ip:port or [ipv6]:port, got \"\(text)\"") }
        } else if fields["server"] == nil {
            fail("\(path).server", "required")
        }
        var nodeID: String?
        if let n = fields["node_id"], let s = string(n, "\(path).node_id") {
            if s.isEmpty { fail("\(path).node_id", "must not be empty") } else { nodeID = s }
        } else if fields["node_id"] == nil {
            fail("\(path).node_id", "required (the node identity the control plane serves)")
        }
        guard let (host, port) = hostPort, let nodeID else { return nil }
        var xds = Config.XDS(host: host, port: port, nodeID: nodeID)
        if let n = fields["node_cluster"], let s = string(n, "\(path).node_cluster") { xds.nodeCluster = s }
        if let n = fields["tls"] { xds.tls = xdsTLS(n, "\(path).tls") }
        if let n = fields["backoff"], let d = duration(n, "\(path).backoff") {
            if d.milliseconds < 10 { fail("\(path).backoff", "must be at least 10ms") } else { xds.backoff = d }
        }
        if let n = fields["max_backoff"], let d = duration(n, "\(path).max_backoff") { xds.maxBackoff = d }
        if xds.maxBackoff < xds.backoff { fail("\(path).max_backoff", "must not be shorter than backoff (\(xds.backoff))") }
        return xds
    }

    mutating func xdsTLS(_ node: Node, _ path: String) -> Config.XDS.TLS? {
        guard let fields = mapping(node, path, keys: ["ca", "cert", "key", "server_name"]) else { return nil }
        var tls = Config.XDS.TLS()
        if let n = fields["server_name"], let name = string(n, "\(path).server_name") {
            if name.isEmpty { fail("\(path).server_name", "must not be empty") } else { tls.serverName = name }
        }
        for (key, keyPath) in [("ca", \Config.XDS.TLS.ca), ("cert", \.cert), ("key", \.key)] {
            guard let n = fields[key], let file = string(n, "\(path).\(key)") else { continue }
            if !FileManager.default.isReadableFile(atPath: file) {
                fail("\(path).\(key)", "cannot read \(file)")
            } else {
                tls[keyPath: keyPath] = file
            }
        }
        if (fields["cert"] == nil) != (fields["key"] == nil) { fail(path, "cert and key go together (a client certificate for mTLS)") }
        return tls
    }

    /// `host:port`, `ip:port` or `[ipv6]:port`.
    static func hostAndPort(_ text: String) -> (String, Int)? {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }), let port = Int(portText), (1...65535).contains(port) else { return nil }
        return (String(host), port)
    }
}
