import Foundation
import XCTest

/// The configuration reference is true to the parser: every key a `mapping(…, keys:)` in
/// Sources/L4Balancer/Config accepts is on docs/configuration.md, and every key the page's
/// YAML shows is one the parser accepts.
final class DocsTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The string literals of every `keys:` list in the parser's sources (from `keys` to the
    /// `else` of the guard that takes them).
    static func parserKeys() throws -> Set<String> {
        let folder = root.appendingPathComponent("Sources/L4Balancer/Config")
        var keys = Set<String>()
        for file in try FileManager.default.contentsOfDirectory(atPath: folder.path) where file.hasPrefix("ConfigParser") {
            let source = try String(contentsOf: folder.appendingPathComponent(file), encoding: .utf8)
            var rest = source[...]
            while let start = rest.range(of: #"keys(: Set<String>)? ?[:=] ?"#, options: .regularExpression) {
                let end = rest[start.upperBound...].range(of: "else")?.lowerBound ?? rest.endIndex
                let list = rest[start.upperBound..<end]
                for match in list.matches(of: /"([a-z_][a-z0-9_]*)"/) { keys.insert(String(match.1)) }
                rest = rest[end...]
            }
        }
        return keys
    }

    /// The keys in the page's YAML blocks (comments dropped): `key:` at a line's start, after
    /// `- `, `{` or `,`.
    static func documentedKeys(_ page: String) -> Set<String> {
        var keys = Set<String>()
        var inYAML = false
        for line in page.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("```") {
                inYAML = line.hasPrefix("```yaml")
                continue
            }
            guard inYAML else { continue }
            let code = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            for match in code.matches(of: #/(?:^|[{,\-]) *([a-z_][a-z0-9_]*): /#) { keys.insert(String(match.1)) }
            for match in code.matches(of: #/(?:^|[{,\-]) *([a-z_][a-z0-9_]*):$/#) { keys.insert(String(match.1)) }
        }
        return keys
    }

    /// Every identifier in the page's code: its YAML blocks (comments too, where optional
    /// keys are shown) and its `…` spans (the tables' dotted paths, `rate_limit.exempt`).
    static func namesInCode(_ page: String) -> Set<String> {
        var code: [Substring] = []
        var inYAML = false
        for line in page.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("```") {
                inYAML = line.hasPrefix("```yaml")
                continue
            }
            if inYAML {
                code.append(line)
            } else {
                code += line.matches(of: #/`([^`]+)`/#).map(\.1)
            }
        }
        return Set(code.flatMap { $0.matches(of: /[a-z_][a-z0-9_]*/).map { String($0.0) } })
    }

    func testConfigurationPageListsEveryKeyTheParserAccepts() throws {
        let page = try String(contentsOf: Self.root.appendingPathComponent("docs/configuration.md"), encoding: .utf8)
        let accepted = try Self.parserKeys()
        XCTAssertGreaterThan(accepted.count, 100, "the parser's keys were not found: \(accepted.sorted())")
        let shown = Self.documentedKeys(page)
        let mentioned = accepted.intersection(Self.namesInCode(page))
        XCTAssertEqual(accepted.subtracting(mentioned).sorted(), [], "keys the parser accepts that docs/configuration.md does not show")
        XCTAssertEqual(shown.subtracting(accepted).sorted(), [], "keys docs/configuration.md shows that the parser refuses")
    }
}
