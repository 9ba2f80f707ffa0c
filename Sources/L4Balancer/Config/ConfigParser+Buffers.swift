import Yams

/// `buffers:` — each worker's receive buffer pool (README "Memory").
extension ConfigWalker {
    mutating func buffers(_ node: Node, _ path: String) -> Config.Buffers {
        var buffers = Config.Buffers()
        guard let fields = mapping(node, path, keys: ["small", "small_size", "large", "large_size"]) else { return buffers }
        // Buffer ids are 16 bits; sizes are bounded so one buffer stays a sane unit of work.
        if let n = fields["small"], let v = int(n, "\(path).small", 64...65_536) { buffers.small = v }
        if let n = fields["large"], let v = int(n, "\(path).large", 1...65_536) { buffers.large = v }
        if let n = fields["small_size"], let v = byteSize(n, "\(path).small_size", 1024...1_048_576) { buffers.smallSize = v }
        if let n = fields["large_size"], let v = byteSize(n, "\(path).large_size", 4096...67_108_864) { buffers.largeSize = v }
        if buffers.largeSize < buffers.smallSize {
            fail("\(path).large_size", "must be at least small_size (\(buffers.smallSize))")
        }
        return buffers
    }

    /// Bytes as an integer or with a binary unit: `16384`, `16KiB`, `1MiB`.
    mutating func byteSize(_ node: Node, _ path: String, _ range: ClosedRange<Int>) -> Int? {
        guard case .scalar(let scalar) = node else {
            fail(path, "expected a size such as 16384, 16KiB or 1MiB, got \(describe(node))")
            return nil
        }
        let text = scalar.string
        let units: [(String, Int)] = [("KiB", 1024), ("MiB", 1 << 20), ("k", 1024), ("K", 1024), ("M", 1 << 20)]
        var value: Int?
        if let plain = Int(text) {
            value = plain
        } else if let (suffix, scale) = units.first(where: { text.hasSuffix($0.0) }), let n = Int(text.dropLast(suffix.count)) {
            value = n * scale
        }
        guard let value else {
            fail(path, "expected a size such as 16384, 16KiB or 1MiB, got \"\(text)\"")
            return nil
        }
        guard range.contains(value) else {
            fail(path, "\(value) bytes out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return value
    }
}
