import Foundation

/// A config as a tree, for the config fuzzer: a base that sets nearly every field, and
/// mutations that put boundary, overflowing, malformed and hostile values into any of them.
/// Rendered as YAML flow style with every scalar double-quoted (the parser reads scalars as
/// text), so control characters travel as `\u0000` escapes.
indirect enum ConfigTree: Equatable {
    case scalar(String)
    case list([ConfigTree])
    case map([(String, ConfigTree)])

    static func == (a: ConfigTree, b: ConfigTree) -> Bool { a.yaml == b.yaml }

    var yaml: String {
        switch self {
        case .scalar(let text): return ConfigTree.quoted(text)
        case .list(let items): return "[" + items.map(\.yaml).joined(separator: ", ") + "]"
        case .map(let fields): return "{" + fields.map { "\(ConfigTree.quoted($0.0)): \($0.1.yaml)" }.joined(separator: ", ") + "}"
        }
    }

    /// The whole file: the top level in block style (a line a key), the rest in flow style.
    var document: String {
        guard case .map(let fields) = self else { return yaml + "\n" }
        return fields.map { "\($0.0): \($0.1.yaml)\n" }.joined()
    }

    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F || (0x80...0x9F).contains(scalar.value) {
                    out += String(format: "\\u%04X", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// Every leaf and inner node, by path of keys and indices.
    func paths(_ prefix: [PathStep] = []) -> [[PathStep]] {
        var result = [prefix]
        switch self {
        case .scalar: break
        case .list(let items):
            for (i, item) in items.enumerated() { result += item.paths(prefix + [.index(i)]) }
        case .map(let fields):
            for (key, value) in fields { result += value.paths(prefix + [.key(key)]) }
        }
        return result
    }

    enum PathStep: Hashable { case key(String), index(Int) }

    /// A path as the parser's errors name it: `.listeners[0].idle_timeout`.
    static func name(_ path: [PathStep]) -> String {
        path.map { step -> String in
            switch step {
            case .key(let k): return ".\(k)"
            case .index(let i): return "[\(i)]"
            }
        }.joined()
    }

    subscript(path: [PathStep]) -> ConfigTree? {
        guard let first = path.first else { return self }
        switch (self, first) {
        case (.list(let items), .index(let i)) where i < items.count: return items[i][Array(path.dropFirst())]
        case (.map(let fields), .key(let k)): return fields.first { $0.0 == k }?.1[Array(path.dropFirst())]
        default: return nil
        }
    }

    /// The tree with the node at `path` replaced (nil: removed).
    func replacing(_ path: [PathStep], with value: ConfigTree?) -> ConfigTree {
        guard let first = path.first else { return value ?? .scalar("") }
        let rest = Array(path.dropFirst())
        switch (self, first) {
        case (.list(var items), .index(let i)) where i < items.count:
            if rest.isEmpty, value == nil { items.remove(at: i) } else { items[i] = items[i].replacing(rest, with: value) }
            return .list(items)
        case (.map(var fields), .key(let k)):
            guard let i = fields.firstIndex(where: { $0.0 == k }) else { return self }
            if rest.isEmpty, value == nil { fields.remove(at: i) } else { fields[i].1 = fields[i].1.replacing(rest, with: value) }
            return .map(fields)
        default:
            return self
        }
    }

    func adding(key: String, _ value: ConfigTree, at path: [PathStep]) -> ConfigTree {
        guard case .map(var fields)? = self[path] else { return self }
        fields.append((key, value))
        return path.isEmpty ? .map(fields) : replacing(path, with: .map(fields))
    }
}

/// The values a field of each kind is tried with: edges of every range the parser uses,
/// one past them, the extremes of Int64 and past it, and malformed text.
enum ConfigValues {
    static let integers: [String] = [
        "0", "1", "-1", "2", "63", "64", "100", "101", "1000", "1024", "4096", "4097", "65535", "65536", "65537", "65538",
        "100000", "1000000", "1000001", "10000000", "10000001", "10000019", "16000000", "16000001", "16777216", "16777217",
        "100000000", "100000001", "2147483647", "2147483648", "4294967295", "4294967296",
        "9007199254740993", "9223372036854775807", "9223372036854775808", "-9223372036854775808", "99999999999999999999999",
        "1e3", "0x10", "1.5", "", " 1", "+1", "٣",
    ]
    static let durations: [String] = [
        "0", "0ms", "1ms", "99ms", "100ms", "1s", "2s", "59m", "1h", "3600s", "3601s", "719h", "720h", "721h", "43200m", "43201m",
        "2592000s", "2592000001ms", "2592001s", "9223372036854775807ms", "9223372036854775808ms", "9223372036854775s",
        "2562047788015215h", "-1s", "1.5s", "1d", "s", "ms", "", "1 s", "1S",
    ]
    static let sizes: [String] = [
        "0", "1023", "1024", "1K", "1k", "1KiB", "16KiB", "64KiB", "1MiB", "1M", "1048576", "1048577", "64MiB", "67108864", "67108865",
        "9007199254740993K", "9223372036854775807", "9007199254740993KiB", "8796093022208MiB", "-1K", "K", "1G",
    ]
    static let rates: [String] = [
        "1/s", "100/s", "0/s", "-1/s", "1e9/s", "1000000001/s", "1e308/s", "inf/s", "nan/s", "1/d", "1/h", "0.00001/h", "/s", "1/",
        "6000/m", "100", "1//s",
    ]
    static let addresses: [String] = [
        "127.0.0.1:1", "127.0.0.1:65535", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:9000", "::1:9000", "[::1]9000", "127.0.0.1",
        "127.0.0.1\u{0}evil.example:28080", "127.0.0.1:80\u{0}1", "127.0.0.1:\u{0}80", "[::1\u{0}]:80", "256.0.0.1:80", "0.0.0.0:80",
        "127.0.0.1:-1", "127.0.0.1: 80", "localhost:80", "", "[]:80", "[fe80::1%lo]:80", "127.0.0.1:99999999999999999999",
    ]
    static let prefixes: [String] = [
        "192.0.2.0/24", "192.0.2.0/33", "192.0.2.0/-1", "2001:db8::/32", "2001:db8::/129", "127.0.0.2\u{0}junk/32",
        "127.0.0.2/\u{0}32", "0.0.0.0/0", "tcp/23", "udp/65535", "tcp/0", "tcp/65536", "sctp/1", "192.0.2.1", "x", "",
    ]
    static let strings: [String] = [
        "", "a", "web", "web\u{0}evil", "line\nbreak", "tab\there", "del\u{7F}", "c1\u{85}", "émoji-🙂",
        String(repeating: "n", count: 4096), "../../etc/passwd", "/dev/null", "{}", "[", "*", "~", "null", "true",
    ]
    static let choices: [String] = [
        "tcp", "udp", "none", "v1", "v2", "client", "user", "kernel", "maglev", "ring_hash", "least_request", "random",
        "round_robin", "source_ip", "source_ip_port", "five_tuple", "json", "text", "off", "auto", "close", "drain", "http",
        "dns", "send_expect", "true", "false", "yes", "",
    ]
    static let everything = integers + durations + sizes + rates + addresses + prefixes + strings + choices

    /// The edges every range the parser uses meets, tried on every leaf of their kind.
    static let edges: [String: [String]] = [
        "integers": ["0", "1", "-1", "100", "1000", "4096", "65535", "65536", "1000000", "10000000", "16777216",
                     "9223372036854775807", "9223372036854775808"],
        "durations": ["0", "1ms", "100ms", "3600s", "720h", "721h", "9223372036854775807ms"],
        "sizes": ["1024", "1048576", "1MiB", "64MiB", "67108865", "9007199254740993K"],
    ]

    /// A value's magnitude, units applied (ms for durations, bytes for sizes); nil for text.
    static func magnitude(_ text: String) -> Double? {
        let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("KiB", 1024), ("MiB", 1_048_576),
                                         ("K", 1024), ("k", 1024), ("M", 1_048_576)]
        if let plain = Double(text), text.allSatisfy(\.isNumber) { return plain }
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            let digits = text.dropLast(suffix.count)
            if !digits.isEmpty, digits.allSatisfy(\.isNumber), let n = Double(digits) { return n * scale }
        }
        return nil
    }
}

/// A seeded generator (SplitMix64): the same seed gives the same inputs, so a failure is
/// reproduced from the seed the test prints.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

struct ConfigMutator {
    let base: ConfigTree

    /// The kind of a leaf, by its key and base value.
    static func kind(for key: String?, current: String) -> String {
        guard let key else { return "everything" }
        if DurationText.parseLike(current) { return "durations" }
        switch key {
        case "address": return "addresses"
        case "small_size", "large_size": return "sizes"
        case "rate": return "rates"
        case "name", "cluster", "token", "path", "host", "sni", "query", "send", "expect", "format", "pin_path": return "strings"
        default: break
        }
        if Int(current) != nil || Double(current) != nil { return "integers" }
        if current.contains("/") || current.contains(".") { return "prefixes" }
        return "choices"
    }

    /// The pool a leaf's values are drawn from.
    static func pool(for key: String?, current: String) -> [String] {
        switch kind(for: key, current: current) {
        case "durations": return ConfigValues.durations
        case "addresses": return ConfigValues.addresses
        case "sizes": return ConfigValues.sizes
        case "rates": return ConfigValues.rates
        case "strings": return ConfigValues.strings
        case "integers": return ConfigValues.integers
        case "prefixes": return ConfigValues.prefixes + ConfigValues.strings
        case "choices": return ConfigValues.choices + ConfigValues.strings
        default: return ConfigValues.everything
        }
    }

    /// One input: 1 to 4 mutations of the base.
    func mutate(_ random: inout SeededRandom) -> ConfigTree {
        var tree = base
        for _ in 0..<Int.random(in: 1...4, using: &random) {
            let paths = tree.paths()
            let path = paths.randomElement(using: &random)!
            let key: String? = path.last.flatMap { if case .key(let k) = $0 { k } else { nil } }
            switch Int.random(in: 0..<100, using: &random) {
            case 0..<70:
                // A leaf's value: from its kind's pool, or now and then from any pool.
                guard case .scalar(let current)? = tree[path] else { fallthrough }
                let pool = Int.random(in: 0..<5, using: &random) == 0 ? ConfigValues.everything : ConfigMutator.pool(for: key, current: current)
                tree = tree.replacing(path, with: .scalar(pool.randomElement(using: &random)!))
            case 70..<78:
                tree = tree.replacing(path, with: nil)
            case 78..<84:
                tree = tree.replacing(path, with: .list([.scalar(ConfigValues.everything.randomElement(using: &random)!)]))
            case 84..<88:
                tree = tree.replacing(path, with: .map([("x", .scalar("1"))]))
            case 88..<94:
                // A list grown: the same element many times (duplicates, capacity).
                if case .list(let items)? = tree[path], let first = items.first {
                    let count = [2, 10, 1025][Int.random(in: 0..<3, using: &random)]
                    tree = tree.replacing(path, with: .list(items + Array(repeating: first, count: count)))
                }
            default:
                let keys = ["unknown", "name", "address", "idle_timeout", "weight", "relay", "tls", "routes", "max_connections"]
                tree = tree.adding(key: keys.randomElement(using: &random)!, .scalar(ConfigValues.everything.randomElement(using: &random)!), at: path)
            }
        }
        return tree
    }

    /// For every leaf of the base: the base with that leaf set to every edge of its kind and
    /// `perLeaf` other values of its pool, drawn.
    func boundaries(perLeaf: Int, _ random: inout SeededRandom) -> [(path: String, value: String, tree: ConfigTree)] {
        var result: [(String, String, ConfigTree)] = []
        for path in base.paths() {
            guard case .scalar(let current)? = base[path] else { continue }
            let key: String? = path.last.flatMap { if case .key(let k) = $0 { k } else { nil } }
            let name = ConfigTree.name(path)
            let pool = ConfigMutator.pool(for: key, current: current)
            let edges = ConfigValues.edges[ConfigMutator.kind(for: key, current: current)] ?? []
            for value in Set(edges + (0..<perLeaf).map { _ in pool.randomElement(using: &random)! }).sorted() {
                result.append((name, value, base.replacing(path, with: .scalar(value))))
            }
        }
        return result
    }
}

private enum DurationText {
    /// `500ms`, `2s`, `5m`, `1h`: a leaf holding one takes durations.
    static func parseLike(_ text: String) -> Bool {
        guard let last = text.last, "smh".contains(last) else { return false }
        return text.dropLast(text.hasSuffix("ms") ? 2 : 1).allSatisfy(\.isNumber) && text.first?.isNumber == true
    }
}
