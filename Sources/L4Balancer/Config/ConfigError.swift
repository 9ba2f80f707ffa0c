/// One problem in a config file, reported as `path: message`
/// (`clusters[0].endpoints[1].address: port 70000 out of range`).
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var message: String

    public init(path: String, message: String) {
        self.path = path
        self.message = message
    }

    public var description: String { path.isEmpty ? message : "\(path): \(message)" }

    /// The page of docs/ that describes what `path` names: the section's own page where it
    /// has one (TLS, discovery, kernel forwarding, filter and rate limits), else the
    /// configuration reference.
    public var documentation: String {
        let parts = path.split(separator: ".").map { $0.split(separator: "[").first.map(String.init) ?? "" }
        if parts.contains("tls") || parts.contains("routes") { return "docs/tls.md" }
        if parts.first == "xds" || parts.contains("dns") { return "docs/discovery.md" }
        if parts.first == "kernel_relay" || parts.contains("relay") { return "docs/kernel-forwarding.md" }
        if parts.first == "filter" || parts.contains("rate_limit") { return "docs/filter-and-rate-limits.md" }
        return "docs/configuration.md"
    }
}

/// Every problem found in one config, all reported at once.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [ConfigError]

    public var description: String { errors.map(\.description).joined(separator: "\n") }

    /// `see docs/configuration.md, docs/tls.md`: the pages that describe what the errors name.
    public var seeAlso: String {
        var pages: [String] = []
        for page in errors.map(\.documentation) where !pages.contains(page) { pages.append(page) }
        return "see " + pages.joined(separator: ", ")
    }
}
