import Yams

/// `buffers:` — each worker's receive buffer pool (docs/configuration.md, "Memory").
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

    /// Each worker reserves address space for its whole pool (pages become resident only
    /// when used): at most 64 GiB a worker and 32 TiB for all of them, a quarter of what a
    /// 47-bit process has, or `run` would fail with ENOMEM where `check` said OK.
    mutating func checkBufferReservation(_ config: Config) {
        let b = config.buffers
        let perWorker = b.small * b.smallSize + b.large * b.largeSize
        let workers: Int
        switch config.workers {
        case .auto: workers = CPUAffinity.allowedCPUs().count
        case .count(let n): workers = n
        }
        if perWorker > 64 << 30 {
            fail("buffers", "\(b.small) × \(b.smallSize) + \(b.large) × \(b.largeSize) bytes is \(perWorker >> 20) MiB a worker; at most 64 GiB")
        } else if perWorker * workers > 32 << 40 {
            fail("buffers", "\(workers) workers × \(perWorker >> 20) MiB of buffers is \((perWorker * workers) >> 30) GiB; at most 32 TiB in all")
        }
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
            let (product, overflow) = n.multipliedReportingOverflow(by: scale)
            guard !overflow else {
                fail(path, "\(text) bytes out of range \(range.lowerBound)...\(range.upperBound)")
                return nil
            }
            value = product
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
