import Atomics
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Writes the access log off the data path: one thread drains every worker's ring
/// (`AccessLogRing`) every few milliseconds, formats the records (JSON or text) and writes
/// them to stdout or a file (opened for appending; reopened on SIGUSR1, for logrotate).
/// When the output blocks or falls behind, the workers' rings fill and their records are
/// dropped and counted (`accessLogDrops`); the data path never waits for it.
public final class AccessLogWriter: @unchecked Sendable {
    let rings: [AccessLogRing]
    let registry: IdentityRegistry
    let path: String
    let format: Config.AccessLog.Format
    let logger: Logging.Logger
    private let running = ManagedAtomic<Bool>(true)
    private let reopenRequested = ManagedAtomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private var fd: Int32 = -1
    private var listenerNames: [String] = []
    private var endpointKeys: [IdentityRegistry.EndpointKey] = []
    public let written = ManagedAtomic<Int>(0)
    /// Lines formatted but not written: the output refused them (full, gone, not open).
    public let dropped = ManagedAtomic<Int>(0)
    private var retryOpenAt: Int64 = 0
    private var warned = false

    init(rings: [AccessLogRing], registry: IdentityRegistry, path: String, format: Config.AccessLog.Format, logger: Logging.Logger) {
        self.rings = rings
        self.registry = registry
        self.path = path
        self.format = format
        self.logger = logger
    }

    func start() {
        let thread = Thread { [self] in
            run()
            finished.signal()
        }
        thread.name = "l4lb-access-log"
        thread.start()
    }

    /// Writes what is left and stops; gives up after 2 s when the output does not take it
    /// (the process is exiting: its workers are done).
    func stop() {
        running.store(false, ordering: .releasing)
        if finished.wait(timeout: .now() + 2) == .timedOut {
            logger.warning("access log: the output is not taking lines; exiting without the last ones")
        }
    }

    /// Closes and reopens the file at the next pass (SIGUSR1).
    public func reopen() {
        reopenRequested.store(true, ordering: .releasing)
    }

    private func open() {
        if path == "stdout" {
            fd = 1
            return
        }
        // Non-blocking: a FIFO or a stalled device must never hold the writer for long
        // (writes wait at most 100 ms, then the batch is dropped and counted).
        fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NONBLOCK, 0o644)
        if fd < 0 {
            if !warned { logger.error("access log: cannot open \(path): \(String(cString: strerror(errno))); lines are dropped and counted until it opens") }
            warned = true
            retryOpenAt = monotonicMilliseconds() + 1000
        } else {
            warned = false
        }
    }

    private func run() {
        open()
        var out: [UInt8] = []
        out.reserveCapacity(1 << 20)
        while true {
            let last = !running.load(ordering: .acquiring)
            if reopenRequested.exchange(false, ordering: .acquiring), path != "stdout" {
                if fd >= 0 { Glibc.close(fd) }
                open()
            } else if fd < 0, monotonicMilliseconds() >= retryOpenAt {
                open()
            }
            var count = 0
            for ring in rings {
                ring.drain { record in
                    append(record, to: &out)
                    count += 1
                }
            }
            if !out.isEmpty {
                let lost = fd >= 0 ? writeAll(out) : count
                written.wrappingIncrement(by: count - lost, ordering: .relaxed)
                if lost > 0 { dropped.wrappingIncrement(by: lost, ordering: .relaxed) }
                out.removeAll(keepingCapacity: true)
            }
            if last { break }
            if count == 0 { usleep(10_000) }
        }
        if fd > 2 { Glibc.close(fd) }
    }

    /// Writes `bytes`; returns how many lines could not be written.
    private func writeAll(_ bytes: [UInt8]) -> Int {
        var offset = 0
        bytes.withUnsafeBytes { raw in
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n > 0 {
                    offset += n
                } else if n < 0, errno == EINTR {
                    continue
                } else if n < 0, errno == EAGAIN {
                    var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    if poll(&p, 1, 100) <= 0 { return }
                } else {
                    return
                }
            }
        }
        guard offset < bytes.count else { return 0 }
        // Whole lines not written (a line cut short counts as lost).
        return bytes[offset...].reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }
    }

    // MARK: Formatting

    private func listenerName(_ id: Int) -> String {
        if id >= listenerNames.count { listenerNames = registry.allListeners }
        return id < listenerNames.count ? listenerNames[id] : "#\(id)"
    }

    private func endpointAddress(_ id: Int32) -> String? {
        guard id >= 0 else { return nil }
        if Int(id) >= endpointKeys.count { endpointKeys = registry.allEndpoints }
        return Int(id) < endpointKeys.count ? endpointKeys[Int(id)].address.description : nil
    }

    static func client(_ record: AccessRecord) -> String {
        switch record.family {
        case 4:
            var ip = record.clientIP.0
            let bytes = withUnsafeBytes(of: &ip) { Array($0.prefix(4)) }
            return SocketAddress(ip: bytes, port: record.clientPort).description
        case 6:
            var ip = record.clientIP
            let bytes = withUnsafeBytes(of: &ip) { Array($0) }
            return SocketAddress(ip: bytes, port: record.clientPort).description
        default:
            return "-"
        }
    }

    static func timestamp(_ milliseconds: Int64) -> String {
        var seconds = time_t(milliseconds / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ v: Int32, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(milliseconds % 1000), 3))Z"
    }

    private func append(_ record: AccessRecord, to out: inout [UInt8]) {
        let time = AccessLogWriter.timestamp(record.endedAt)
        let listener = listenerName(Int(record.listener))
        let client = AccessLogWriter.client(record)
        let endpoint = endpointAddress(record.endpoint)
        let end = EndReason(rawValue: record.reason)?.name ?? "error"
        let line: String
        switch format {
        case .json:
            line = "{\"time\":\"\(time)\",\"listener\":\(jsonString(listener)),\"client\":\"\(client)\","
                + "\"endpoint\":\(endpoint.map { "\"\($0)\"" } ?? "null"),\"bytes_in\":\(record.bytesFromClient),"
                + "\"bytes_out\":\(record.bytesFromUpstream),\"duration_ms\":\(record.durationMilliseconds),\"end\":\"\(end)\"}\n"
        case .text:
            line = "\(time) \(listener) \(client) -> \(endpoint ?? "-") in=\(record.bytesFromClient) out=\(record.bytesFromUpstream) \(record.durationMilliseconds)ms \(end)\n"
        }
        out.append(contentsOf: line.utf8)
    }

    private func jsonString(_ text: String) -> String {
        var escaped = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": escaped += "\\\""
            case "\\": escaped += "\\\\"
            case _ where scalar.value < 0x20: escaped += String(format: "\\u%04x", scalar.value)
            default: escaped.unicodeScalars.append(scalar)
            }
        }
        return escaped + "\""
    }
}
