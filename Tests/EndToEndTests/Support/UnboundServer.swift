import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Debian's unbound on loopback serving a `svc.test` zone from `local-data`, changed live
/// with `unbound-control local_data` / `local_data_remove` (issue 36): the resolver a DNS
/// discovery test talks to. Answers in rotating order (`rrset-roundrobin`).
final class UnboundServer {
    let port: UInt16
    private let controlPort: UInt16
    let directory: URL
    private let process: ChildProcess

    /// `records`: local-data lines, e.g. `"web.svc.test. 2 IN A 127.0.0.11"`; `extra`: more
    /// `server:` options; `tail`: clauses after them (a `forward-zone:`).
    init(records: [String], extra: [String] = [], tail: [String] = []) throws {
        port = Sockets.freePort()
        controlPort = Sockets.freePort()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-unbound-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let d = directory.path
        try """
            server:
              interface: 127.0.0.1@\(port)
              port: \(port)
              do-daemonize: no
              use-syslog: no
              logfile: "\(d)/unbound.log"
              username: ""
              chroot: ""
              directory: "\(d)"
              pidfile: "\(d)/unbound.pid"
              do-ip6: no
              num-threads: 1
              access-control: 127.0.0.0/8 allow
              module-config: "iterator"
              rrset-roundrobin: yes
              # Nothing leaves this host: every name outside the test zones is refused.
              local-zone: "." refuse
              local-zone: "svc.test." static
            \(extra.map { "  \($0)" }.joined(separator: "\n"))
            \(records.map { "  local-data: \"\($0)\"" }.joined(separator: "\n"))
            \(tail.joined(separator: "\n"))
            remote-control:
              control-enable: yes
              control-interface: 127.0.0.1
              control-port: \(controlPort)
              control-use-cert: no
            """.write(to: directory.appendingPathComponent("unbound.conf"), atomically: true, encoding: .utf8)
        process = try ChildProcess("/usr/sbin/unbound", ["-d", "-c", directory.appendingPathComponent("unbound.conf").path],
                                   stdout: directory.appendingPathComponent("out.log").path, stderr: directory.appendingPathComponent("out.log").path)
        guard waitUntil(timeout: 10, { (try? self.control(["status"])) != nil }) else {
            stop()
            throw Sockets.Failure("unbound did not start: \((try? String(contentsOf: directory.appendingPathComponent("out.log"), encoding: .utf8)) ?? "")", 0)
        }
    }

    var address: String { "127.0.0.1:\(port)" }

    /// Runs `unbound-control` against this server; throws unless it succeeds.
    @discardableResult
    func control(_ arguments: [String]) throws -> String {
        let result = try ChildProcess.run("/usr/sbin/unbound-control", ["-c", directory.appendingPathComponent("unbound.conf").path] + arguments)
        guard result.status == 0 else { throw Sockets.Failure("unbound-control \(arguments.joined(separator: " ")): \(result.output)", 0) }
        return result.output
    }

    /// Replaces every record of `name` with `records` (local-data lines).
    func replace(_ name: String, with records: [String]) throws {
        try control(["local_data_remove", name])
        for record in records { try control(["local_data", record]) }
    }

    /// SIGSTOP / SIGCONT: a resolver that stops answering, then comes back.
    func pause() { process.signal(SIGSTOP) }
    func resume() { process.signal(SIGCONT) }

    func stop() {
        process.signal(SIGCONT)
        process.terminate()
        _ = process.wait(timeout: 5)
        try? FileManager.default.removeItem(at: directory)
    }
}
