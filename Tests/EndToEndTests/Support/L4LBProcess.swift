import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The `l4lb` binary under test, run as a real process with a config written to a
/// temporary file.
final class L4LBProcess {
    let process: ChildProcess
    let directory: URL
    let logURL: URL
    private var stopped = false

    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["L4LB_BINARY"] { return path }
        // Tests/EndToEndTests/Support/ → package root.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
        // The newest of the release and debug builds.
        let candidates = ["release", "debug"].map { root.appendingPathComponent(".build/\($0)/l4lb").path }
            .filter { FileManager.default.isExecutableFile(atPath: $0) }
        func modified(_ path: String) -> Date {
            ((try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date) ?? .distantPast
        }
        return candidates.max { modified($0) < modified($1) } ?? "l4lb"
    }

    /// Starts `l4lb run` and waits until `listen` accepts connections.
    init(config: String, waitFor listen: (host: String, port: UInt16)?, environment: [String: String] = [:],
         file: StaticString = #filePath, line: UInt = #line) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let configURL = directory.appendingPathComponent("l4lb.yaml")
        try config.write(to: configURL, atomically: true, encoding: .utf8)
        logURL = directory.appendingPathComponent("l4lb.log")
        _ = FileManager.default.createFile(atPath: logURL.path, contents: nil)
        process = try ChildProcess(L4LBProcess.binary, ["run", "--config", configURL.path], stderr: logURL.path, environment: environment)
        if let listen {
            let up = waitUntil(timeout: 10) {
                guard self.process.isRunning else { return false }
                guard let fd = try? Sockets.connect(host: listen.host, port: listen.port, timeout: 1) else { return false }
                close(fd)
                return true
            }
            if !up {
                stop()
                XCTFail("l4lb did not start listening on \(listen.host):\(listen.port); log:\n\(log)", file: file, line: line)
                throw Sockets.Failure("l4lb start", 0)
            }
        }
    }

    deinit { stop() }

    var pid: Int32 { process.pid }
    var log: String { (try? String(contentsOf: logURL, encoding: .utf8)) ?? "" }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    func memoryKiB(_ field: String) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
        for line in status.split(separator: "\n") where line.hasPrefix(field + ":") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? -1
        }
        return -1
    }

    /// User + system CPU seconds the process has used so far.
    var cpuSeconds: Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let end = stat.lastIndex(of: ")") else { return -1 }
        let fields = stat[stat.index(after: end)...].split(separator: " ")
        // After the command name: state is field 3, utime 14, stime 15.
        let ticks = (Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Waits until the process uses less than 5% of a CPU over half a second.
    func waitUntilQuiet(timeout: TimeInterval) -> Bool {
        var last = cpuSeconds
        return waitUntil(timeout: timeout) {
            usleep(500_000)
            let now = cpuSeconds
            defer { last = now }
            return now - last < 0.025
        }
    }

    /// Sends SIGTERM.
    func terminate() { process.terminate() }

    /// Waits for the process to exit; returns its status, nil on timeout.
    func waitForExit(timeout: TimeInterval) -> Int32? { process.wait(timeout: timeout) }

    /// Stops the process (SIGTERM, then SIGKILL) and waits for it.
    func stop() {
        guard !stopped else { return }
        stopped = true
        if process.isRunning {
            terminate()
            if waitForExit(timeout: 5) == nil {
                process.signal(SIGKILL)
                process.wait()
            }
        }
        try? FileManager.default.removeItem(at: directory)
    }

    /// Stops the process gracefully and returns its log (for the exit summary).
    func stopAndCollectLog() -> (status: Int32?, log: String) {
        terminate()
        let status = waitForExit(timeout: 10)
        let text = log
        stop()
        return (status, text)
    }

    /// Runs `l4lb ARGS…` to completion: exit status and combined output.
    static func runCommand(_ arguments: [String]) throws -> (status: Int32, output: String) {
        try ChildProcess.run(binary, arguments)
    }
}

/// Waits until a log line contains every one of `parts`; returns how long it took.
func waitForLogLine(_ proxy: L4LBProcess, containing parts: [String], timeout: TimeInterval) -> TimeInterval? {
    let start = Date()
    let found = waitUntil(timeout: timeout) {
        proxy.log.split(separator: "\n").contains { line in parts.allSatisfy { line.contains($0) } }
    }
    return found ? Date().timeIntervalSince(start) : nil
}

/// A counter from the exit log's `endpoint totals` line for `endpoint`.
func endpointCounter(_ log: String, endpoint: String, _ name: String) -> Int? {
    totalsCounter(log, line: "endpoint totals", key: "endpoint=\(endpoint) ", name)
}

/// A summary counter from the exit log line (`listener totals … connect_failed=N …`).
func summaryCounter(_ log: String, listener: String, _ name: String) -> Int? {
    totalsCounter(log, line: "listener totals", key: "listener=\(listener) ", name)
}

/// A counter from the exit log's `worker totals` line of worker `index`.
func workerCounter(_ log: String, worker index: Int, _ name: String) -> Int? {
    totalsCounter(log, line: "worker totals", key: "worker=\(index) ", name)
}

private func totalsCounter(_ log: String, line kind: String, key: String, _ name: String) -> Int? {
    for line in log.split(separator: "\n") where line.contains(kind) && line.contains(key) {
        for field in line.split(separator: " ") where field.hasPrefix(name + "=") {
            return Int(field.dropFirst(name.count + 1))
        }
    }
    return nil
}
