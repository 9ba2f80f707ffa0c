import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A program the tests run (l4lb, redis-server, nginx, prlimit): `posix_spawn`, reaped
/// with `waitpid`. Foundation's `Process` is not used: it watches each child through a
/// socket pair on a background run loop that closes descriptors after the child exits,
/// which is one more thing closing descriptors while tests open sockets. The child gets
/// none of the test's descriptors (sockets a test closes must really close), stdin from
/// /dev/null, and stdout and stderr to a file or /dev/null.
final class ChildProcess: @unchecked Sendable {
    let pid: pid_t
    private let lock = NSLock()
    private var status: Int32?

    /// `environment` is added to the test process's own. `descriptors` maps the test's
    /// descriptors to the child's (e.g. pipes as 3 and 4); every other one above 2 closes.
    init(_ executable: String, _ arguments: [String], stdout: String = "/dev/null", stderr: String = "/dev/null",
         environment: [String: String] = [:], descriptors: [(parent: Int32, child: Int32)] = []) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        if stderr == stdout {
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        } else {
            posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        }
        for mapping in descriptors { posix_spawn_file_actions_adddup2(&actions, mapping.parent, mapping.child) }
        ChildProcess.closeInheritedDescriptors(&actions, from: (descriptors.map(\.child).max() ?? 2) + 1)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var inherited: [UnsafeMutablePointer<CChar>?] = []
        var entry = environ
        while let variable = entry.pointee {
            inherited.append(variable)
            entry += 1
        }
        let added = environment.map { strdup("\($0.key)=\($0.value)") }
        defer { added.forEach { free($0) } }
        let envp = inherited + added + [nil]
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        guard rc == 0 else { throw Sockets.Failure("posix_spawn \(executable)", rc) }
        self.pid = pid
    }

    /// Every descriptor from `first` up closes in the child: glibc's `addclosefrom_np` when it is
    /// there (2.34+; Swift's Glibc module does not declare it), else one close per open
    /// descriptor.
    private static func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t, from first: Int32) {
        typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, first)
            return
        }
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap({ Int32($0) }) where fd >= first {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
    }

    /// Reaps the child if it has exited; returns its wait status.
    private func reap(blocking: Bool) -> Int32? {
        lock.withLock {
            if let status { return status }
            var raw: Int32 = 0
            while true {
                let rc = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
                if rc == pid { status = raw; return raw }
                if rc < 0, errno == EINTR { continue }
                return nil
            }
        }
    }

    var isRunning: Bool { reap(blocking: false) == nil }

    func signal(_ signal: Int32) {
        guard isRunning else { return }
        kill(pid, signal)
    }

    func terminate() { signal(SIGTERM) }

    /// Waits for the child to exit: its exit code (128 + signal when killed).
    @discardableResult
    func wait() -> Int32 { ChildProcess.exitCode(reap(blocking: true) ?? 0) }

    /// Waits up to `timeout`; nil when still running.
    func wait(timeout: TimeInterval) -> Int32? {
        guard waitUntil(timeout: timeout, { !isRunning }) else { return nil }
        return wait()
    }

    /// WEXITSTATUS / WTERMSIG, macros Swift cannot import.
    private static func exitCode(_ status: Int32) -> Int32 {
        let signal = status & 0x7F
        return signal == 0 ? (status >> 8) & 0xFF : 128 + signal
    }

    /// Runs to completion: exit code and combined output.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-out-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let child = try ChildProcess(executable, arguments, stdout: output, stderr: output, environment: environment)
        let status = child.wait()
        // Lossy: a child may print bytes that are not UTF-8 (s_client echoes binary data).
        return (status, FileManager.default.contents(atPath: output).map { String(decoding: $0, as: UTF8.self) } ?? "")
    }
}
