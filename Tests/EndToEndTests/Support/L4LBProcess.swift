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
    let configURL: URL
    /// The admin API's port: the config's, or a free one the harness added when the config
    /// sets no `admin:` (so runs never contend for the default 9901).
    let adminPort: UInt16
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
         stdout: String = "/dev/null", arguments extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        configURL = directory.appendingPathComponent("l4lb.yaml")
        var text = config
        if let port = L4LBProcess.adminPort(in: config) {
            adminPort = port
        } else {
            adminPort = Sockets.freePort()
            text = "admin: { address: 127.0.0.1:\(adminPort) }\n" + config
        }
        try text.write(to: configURL, atomically: true, encoding: .utf8)
        logURL = directory.appendingPathComponent("l4lb.log")
        _ = FileManager.default.createFile(atPath: logURL.path, contents: nil)
        process = try ChildProcess(L4LBProcess.binary, ["run", "--config", configURL.path] + extra, stdout: stdout, stderr: logURL.path, environment: environment)
        if let listen {
            // The admin API and the listener both up (they start concurrently). The admin
            // API first: tests count the connections the listener gets, so the probe
            // reaches it once, not once per retry.
            // Generous: in a fresh network namespace, attaching XDP takes the kernel's RTNL
            // lock, which the teardown of the previous test's namespaces can hold for seconds
            // on a busy host (seen once in CI: l4lb silent for over 10 s before attaching).
            let up = waitUntil(timeout: 30) {
                guard self.process.isRunning else { return false }
                for (host, port) in [("127.0.0.1", self.adminPort), (listen.host, listen.port)] {
                    guard let fd = try? Sockets.connect(host: host, port: port, timeout: 1) else { return false }
                    close(fd)
                }
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

    /// The port of `admin: { address: HOST:PORT ...` in a config, if it sets one.
    static func adminPort(in config: String) -> UInt16? {
        guard let line = config.split(separator: "\n").first(where: { $0.hasPrefix("admin:") }),
              let range = line.range(of: #":(\d+)[ ,}"]"#, options: .regularExpression)
        else { return nil }
        return UInt16(line[range].dropFirst().dropLast())
    }

    /// Replaces the config file (for a reload to pick up). A config without `admin:` gets
    /// the harness's admin address, as at start.
    func writeConfig(_ config: String) throws {
        let text = config.contains("admin:") ? config : "admin: { address: 127.0.0.1:\(adminPort) }\n" + config
        let temporary = directory.appendingPathComponent("l4lb.yaml.new")
        try text.write(to: temporary, atomically: false, encoding: .utf8)
        // rename(2): a reload reads the old file or the new one, never half of one.
        guard rename(temporary.path, configURL.path) == 0 else { throw Sockets.Failure("rename", errno) }
    }

    /// A request to the admin API.
    func admin(_ method: String, _ path: String, token: String? = nil) throws -> AdminHTTP.Response {
        try AdminHTTP.request(port: adminPort, method, path, token: token)
    }

    /// `GET /stats`, parsed.
    func stats(token: String? = nil) throws -> [String: Any] {
        let response = try admin("GET", "/stats", token: token)
        guard response.status == 200 else { throw Sockets.Failure("GET /stats: \(response.status) \(response.text)", 0) }
        return response.json
    }

    /// Descriptors, threads and resident memory of the process now.
    var resources: (descriptors: Int, threads: Int, rssKiB: Int) {
        let descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count ?? -1
        return (descriptors, memoryKiB("Threads"), memoryKiB("VmRSS"))
    }

    var pid: Int32 { process.pid }
    var log: String { (try? String(contentsOf: logURL, encoding: .utf8)) ?? "" }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    func memoryKiB(_ field: String) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
        for line in status.split(separator: "\n") where line.hasPrefix(field + ":") {
            return Int(line.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().first ?? "") ?? -1
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

    /// Stops the process (SIGTERM, then SIGKILL) and waits for it. Every test that runs
    /// l4lb checks here that its relays kept to their state table (the exit summary names
    /// any transition outside it; release builds count them rather than stop).
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
        if let line = log.split(separator: "\n").first(where: { $0.contains("relay state violations") }) {
            XCTFail("l4lb made relay transitions outside the table: \(line)")
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
    static func runCommand(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        try ChildProcess.run(binary, arguments, environment: environment)
    }

    /// `l4lb ARGS… --admin URL-of-this-process`.
    func runAdminCommand(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        try L4LBProcess.runCommand(arguments + ["--admin", "http://127.0.0.1:\(adminPort)"], environment: environment)
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
