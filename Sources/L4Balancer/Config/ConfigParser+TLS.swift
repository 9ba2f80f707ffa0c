import Yams

/// `listeners[].tls`: certificates (checked now, `TLSMaterial`), versions, ciphers, ALPN,
/// resumption, client certificates, the handshake timeout.
extension ConfigWalker {
    mutating func tls(_ node: Node, _ path: String) -> Config.TLS? {
        guard let fields = mapping(node, path, keys: [
            "certificates", "min_version", "ciphers", "ciphersuites", "alpn", "session_tickets", "session_cache_size",
            "client_auth", "handshake_timeout",
        ]) else { return nil }
        var tls = Config.TLS()
        if let n = fields["certificates"] {
            tls.certificates = list(n, "\(path).certificates", required: true) { walker, item, itemPath in
                walker.tlsCertificate(item, itemPath)
            }
        } else {
            fail("\(path).certificates", "required")
        }
        if let n = fields["min_version"], let v = choice(n, "\(path).min_version", Config.TLS.Version.self) { tls.minVersion = v }
        (tls.ciphers, tls.ciphersuites, tls.alpn) = cipherSettings(fields, path)
        if let n = fields["session_tickets"], let b = bool(n, "\(path).session_tickets") { tls.sessionTickets = b }
        if let n = fields["session_cache_size"], let v = int(n, "\(path).session_cache_size", 0...10_000_000) { tls.sessionCacheSize = v }
        if let n = fields["handshake_timeout"], let d = duration(n, "\(path).handshake_timeout") {
            if d.milliseconds <= 0 { fail("\(path).handshake_timeout", "must be greater than 0") } else { tls.handshakeTimeout = d }
        }
        if let n = fields["client_auth"] { tls.clientAuth = clientAuth(n, "\(path).client_auth") }
        return tls
    }

    /// `ciphers`, `ciphersuites` (each checked with OpenSSL) and `alpn`, for either side.
    mutating func cipherSettings(_ fields: [String: Node], _ path: String) -> (ciphers: String?, ciphersuites: String?, alpn: [String]) {
        var result: (ciphers: String?, ciphersuites: String?, alpn: [String]) = (nil, nil, [])
        if let n = fields["ciphers"], let s = string(n, "\(path).ciphers") {
            if !TLSServerContext.acceptsCipherList(s, suites: false) { fail("\(path).ciphers", "OpenSSL accepts no cipher in \"\(s)\"") }
            result.ciphers = s
        }
        if let n = fields["ciphersuites"], let s = string(n, "\(path).ciphersuites") {
            if !TLSServerContext.acceptsCipherList(s, suites: true) { fail("\(path).ciphersuites", "OpenSSL accepts no TLS 1.3 suite in \"\(s)\"") }
            result.ciphersuites = s
        }
        if let n = fields["alpn"] {
            result.alpn = list(n, "\(path).alpn", required: false) { walker, item, itemPath in
                guard let s = walker.string(item, itemPath) else { return nil }
                if s.isEmpty || s.utf8.count > 255 { walker.fail(itemPath, "a protocol name is 1 to 255 bytes") }
                return s
            }
        }
        return result
    }

    /// `clusters[].tls`: l4lb speaks TLS to the endpoints. `verify` (default true) checks
    /// the chain against `ca` (else the system's trust store) and, when `sni` is set, that
    /// the certificate names it.
    mutating func upstreamTLS(_ node: Node, _ path: String) -> Config.UpstreamTLS? {
        guard let fields = mapping(node, path, keys: [
            "sni", "ca", "verify", "client_cert", "min_version", "ciphers", "ciphersuites", "alpn", "session_reuse",
        ]) else { return nil }
        var tls = Config.UpstreamTLS()
        if let n = fields["sni"], let s = string(n, "\(path).sni") {
            if s.isEmpty || s.utf8.count > 253 || s.contains(" ") { fail("\(path).sni", "\"\(s)\" is not a host name") }
            tls.serverName = s
        }
        if let n = fields["verify"], let b = bool(n, "\(path).verify") { tls.verify = b }
        if let n = fields["ca"], let caPath = string(n, "\(path).ca") {
            do {
                tls.caPEM = try TLSMaterial.authorities(caPath)
                tls.caPath = caPath
            } catch {
                fail("\(path).ca", error.message)
            }
            if !tls.verify { fail("\(path).ca", "set with verify: false; the CA would not be used") }
        }
        if let n = fields["client_cert"] { tls.clientCertificate = tlsCertificate(n, "\(path).client_cert") }
        if let n = fields["min_version"], let v = choice(n, "\(path).min_version", Config.TLS.Version.self) { tls.minVersion = v }
        (tls.ciphers, tls.ciphersuites, tls.alpn) = cipherSettings(fields, path)
        if let n = fields["session_reuse"], let b = bool(n, "\(path).session_reuse") { tls.sessionReuse = b }
        return tls
    }

    /// `routes: [{server_names: [...], cluster: NAME}]`: each name once across routes.
    mutating func routes(_ node: Node, _ path: String, clusters known: [String: Int]) -> [Config.Listener.Route] {
        var seen: [String: String] = [:]
        return list(node, path, required: true) { walker, item, itemPath in
            guard let fields = walker.mapping(item, itemPath, keys: ["server_names", "cluster"]) else { return nil }
            var cluster = ""
            if let n = fields["cluster"], let name = walker.string(n, "\(itemPath).cluster") {
                if known[name] == nil, !walker.clustersFromXDS { walker.fail("\(itemPath).cluster", "unknown cluster \"\(name)\"") }
                cluster = name
            } else if fields["cluster"] == nil {
                walker.fail("\(itemPath).cluster", "required")
            }
            guard let n = fields["server_names"] else {
                walker.fail("\(itemPath).server_names", "required")
                return nil
            }
            let names: [String] = walker.list(n, "\(itemPath).server_names", required: true) { walker, item, namePath in
                guard let name = walker.string(item, namePath) else { return nil }
                let folded = name.lowercased()
                let host = folded.hasPrefix("*.") ? String(folded.dropFirst(2)) : folded
                let valid = host.utf8.count <= 253 && !host.isEmpty
                    && host.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
                        !label.isEmpty && label.utf8.allSatisfy { c in
                            (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) || c == 0x2D || c == 0x5F
                        }
                    }
                if !valid {
                    walker.fail(namePath, "\"\(name)\" is not a host name or *.suffix")
                    return nil
                }
                if let other = seen[folded] {
                    walker.fail(namePath, "\"\(name)\" is already routed by \(other)")
                } else {
                    seen[folded] = namePath
                }
                return folded
            }
            return Config.Listener.Route(serverNames: names, cluster: cluster)
        }
    }

    mutating func tlsCertificate(_ node: Node, _ path: String) -> Config.TLS.Certificate? {
        guard let fields = mapping(node, path, keys: ["cert", "key"]) else { return nil }
        guard let c = fields["cert"] else {
            fail("\(path).cert", "required")
            return nil
        }
        guard let k = fields["key"] else {
            fail("\(path).key", "required")
            return nil
        }
        guard let certPath = string(c, "\(path).cert"), let keyPath = string(k, "\(path).key") else { return nil }
        do {
            return try TLSMaterial.certificate(certPath: certPath, keyPath: keyPath)
        } catch {
            fail(path, error.message)
            return nil
        }
    }

    mutating func clientAuth(_ node: Node, _ path: String) -> Config.TLS.ClientAuth? {
        guard let fields = mapping(node, path, keys: ["ca", "required", "crl"]) else { return nil }
        guard let n = fields["ca"], let caPath = string(n, "\(path).ca") else {
            if fields["ca"] == nil { fail("\(path).ca", "required") }
            return nil
        }
        var auth: Config.TLS.ClientAuth
        do {
            auth = Config.TLS.ClientAuth(caPath: caPath, caPEM: try TLSMaterial.authorities(caPath))
        } catch {
            fail("\(path).ca", error.message)
            return nil
        }
        if let n = fields["required"], let b = bool(n, "\(path).required") { auth.required = b }
        if let n = fields["crl"], let crlPath = string(n, "\(path).crl") {
            do {
                auth.crlPEM = try TLSMaterial.revocations(crlPath)
                auth.crlPath = crlPath
            } catch {
                fail("\(path).crl", error.message)
            }
        }
        return auth
    }
}
