import Foundation
import XCTest

/// The shape the data plane keeps (issue 37): `Worker` is the loop, the ring and the
/// dispatch over a few owned parts, so it holds at most 20 stored properties; no source
/// file grows past 450 lines; no function on the data path past 80 lines; and no handler
/// compares raw error numbers (they go through `Errno`, socket calls through
/// `SocketCalls`). Read from the sources, so a change that breaks the shape fails here.
final class HouseTests: XCTestCase {
    static let sources = DocsTests.root.appendingPathComponent("Sources")

    static func swiftFiles(under folder: URL) throws -> [URL] {
        let enumerator = FileManager.default.enumerator(at: folder, includingPropertiesForKeys: nil)
        var files: [URL] = []
        while let url = enumerator?.nextObject() as? URL {
            if url.pathExtension == "swift" { files.append(url) }
        }
        return files.sorted { $0.path < $1.path }
    }

    /// A line without its comment and string literals (enough for counting braces).
    static func code(_ line: Substring) -> String {
        var text = String(line.replacing(#/"(?:[^"\\]|\\.)*"/#, with: "\"\""))
        if let comment = text.range(of: "//") { text = String(text[..<comment.lowerBound]) }
        return text
    }

    /// The declarations at depth 1 of `final class Worker` that store a value: `let` or
    /// `var` without a body (computed properties and statics are not stored).
    func testWorkerHoldsAtMostTwentyStoredProperties() throws {
        let file = HouseTests.sources.appendingPathComponent("L4Balancer/DataPlane/Worker.swift")
        let lines = try String(contentsOf: file, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
        var depth = 0
        var inWorker = false
        var stored: [String] = []
        for line in lines {
            let text = HouseTests.code(line)
            if text.hasPrefix("final class Worker ") { inWorker = true }
            if inWorker, depth == 1, text.wholeMatch(of: #/    (?:let|var) (\w+)[^{]*/#) != nil,
               let name = text.firstMatch(of: #/(?:let|var) (\w+)/#)?.1 {
                stored.append(String(name))
            }
            depth += text.count { $0 == "{" } - text.count { $0 == "}" }
            if inWorker, depth == 0, text.contains("}") { break }
        }
        XCTAssertGreaterThan(stored.count, 5, "the count found no properties: is the parse still right?")
        XCTAssertLessThanOrEqual(stored.count, 20, "Worker stores \(stored.count) properties: \(stored)")
    }

    /// Extensions cannot add stored properties, so Worker.swift is the only place to look;
    /// every other file is held to 450 lines.
    func testNoSourceFileIsLongerThan450Lines() throws {
        var long: [String] = []
        for file in try HouseTests.swiftFiles(under: HouseTests.sources) {
            let count = try String(contentsOf: file, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false).count
            if count > 450 { long.append("\(file.lastPathComponent): \(count)") }
        }
        XCTAssertEqual(long, [], "files over 450 lines")
    }

    /// Every function, initializer and subscript in DataPlane/ and URing/, from its
    /// declaration to its closing brace.
    func testNoDataPathFunctionIsLongerThan80Lines() throws {
        var long: [String] = []
        var measured = 0
        for folder in ["L4Balancer/DataPlane", "URing"] {
            for file in try HouseTests.swiftFiles(under: HouseTests.sources.appendingPathComponent(folder)) {
                let lines = try String(contentsOf: file, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
                var index = 0
                while index < lines.count {
                    let text = HouseTests.code(lines[index])
                    guard text.firstMatch(of: #/^\s*(?:@\w+(?:\([^)]*\))?\s+)*(?:(?:public|private|fileprivate|internal|static|mutating|override|final|@inlinable)\s+)*(?:func|init|subscript)\b/#) != nil
                    else {
                        index += 1
                        continue
                    }
                    var depth = 0
                    var opened = false
                    var end = index
                    while end < lines.count {
                        let body = HouseTests.code(lines[end])
                        depth += body.count { $0 == "{" } - body.count { $0 == "}" }
                        if body.contains("{") { opened = true }
                        if opened, depth <= 0 { break }
                        end += 1
                    }
                    measured += 1
                    let length = end - index + 1
                    if length > 80 { long.append("\(file.lastPathComponent):\(index + 1): \(length) lines") }
                    index += 1
                }
            }
        }
        XCTAssertGreaterThan(measured, 200, "the scan found too few functions: is the parse still right?")
        XCTAssertEqual(long, [], "data-path functions over 80 lines")
    }

    /// Errors are `Errno` values (`Completion.error`, `SocketCalls`), never `-ENOBUFS`
    /// compared by hand in the worker's handlers.
    func testHandlersCompareNoRawErrorNumbers() throws {
        var raw: [String] = []
        for file in try HouseTests.swiftFiles(under: HouseTests.sources.appendingPathComponent("L4Balancer/DataPlane")) {
            let lines = try String(contentsOf: file, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
            for (i, line) in lines.enumerated() {
                let text = HouseTests.code(line)
                if text.firstMatch(of: #/-E[A-Z]{3,}\b|case E[A-Z]{3,}\b|== E[A-Z]{3,}\b/#) != nil {
                    raw.append("\(file.lastPathComponent):\(i + 1)")
                }
            }
        }
        XCTAssertEqual(raw, [], "raw error numbers compared")
    }
}
