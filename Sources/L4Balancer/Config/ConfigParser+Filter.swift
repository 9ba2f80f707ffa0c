import BPFSteer
import Yams

/// `filter:` — the XDP attachment and the lists (DESIGN §6, §7).
extension ConfigWalker {
    mutating func filter(_ node: Node, _ path: String) -> Config.Filter {
        var filter = Config.Filter()
        guard let fields = mapping(node, path, keys: ["xdp", "block_sources", "allow_sources", "block_ports"]) else { return filter }
        if let xdp = fields["xdp"], let xdpFields = mapping(xdp, "\(path).xdp", keys: ["interfaces", "mode", "pin_path"]) {
            if let n = xdpFields["interfaces"] { filter.interfaces = interfaceNames(n, "\(path).xdp.interfaces", required: false) }
            if let n = xdpFields["mode"], let mode = choice(n, "\(path).xdp.mode", Config.Filter.Mode.self) { filter.mode = mode }
            if let n = xdpFields["pin_path"], let p = string(n, "\(path).xdp.pin_path") {
                if !p.hasPrefix("/") || p == "/" { fail("\(path).xdp.pin_path", "must be an absolute directory on a bpf filesystem") } else { filter.pinPath = p }
            }
        }
        /// One list's entries; `wantsPorts` says which kind belongs in it.
        func entries(_ key: String, wantsPorts: Bool) -> [FilterEntry] {
            guard let n = fields[key] else { return [] }
            return list(n, "\(path).\(key)", required: false) { walker, item, itemPath in
                guard let text = walker.string(item, itemPath) else { return nil }
                switch FilterEntry.parse(text) {
                case .success(let entry):
                    switch (entry, wantsPorts) {
                    case (.source, false), (.port, true): return entry
                    case (.port, false): walker.fail(itemPath, "'\(entry)' is a port: list it under \(path).block_ports")
                    case (.source, true): walker.fail(itemPath, "'\(entry)' is a source prefix, not tcp/PORT or udp/PORT")
                    }
                case .failure(let error):
                    walker.fail(itemPath, error.description)
                }
                return nil
            }
        }
        func prefixes(_ entries: [FilterEntry]) -> [SourcePrefix] {
            entries.compactMap { if case .source(let prefix) = $0 { prefix } else { nil } }
        }
        filter.blockSources = prefixes(entries("block_sources", wantsPorts: false))
        filter.allowSources = prefixes(entries("allow_sources", wantsPorts: false))
        filter.blockPorts = entries("block_ports", wantsPorts: true).compactMap { if case .port(let rule) = $0 { rule } else { nil } }
        return filter
    }
}

extension ConfigWalker {
    /// A list of interface names, each once (`filter.xdp.interfaces`, `kernel_relay.interfaces`).
    mutating func interfaceNames(_ node: Node, _ path: String, required: Bool) -> [String] {
        let names: [String] = list(node, path, required: required) { walker, item, itemPath -> String? in
            guard let name = walker.string(item, itemPath) else { return nil }
            guard !name.isEmpty, name.utf8.count < 16, !name.contains("/") else {
                walker.fail(itemPath, "'\(name)' is not an interface name")
                return nil
            }
            return name
        }
        var seen = Set<String>()
        for (i, name) in names.enumerated() where !seen.insert(name).inserted {
            fail("\(path)[\(i)]", "\(name) is listed twice")
        }
        return names
    }
}
