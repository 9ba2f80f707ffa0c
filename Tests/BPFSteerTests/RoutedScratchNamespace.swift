import CTestSupport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A network namespace with routes to the documentation networks the forwarder's unit
/// tests rewrite toward, so its FIB lookups succeed under BPF_PROG_TEST_RUN (which runs
/// the program in the calling thread's namespace, with `lo` as the arriving interface).
/// Two veth pairs whose far ends stay in the namespace (this kernel has no dummy
/// devices); nothing is sent anywhere:
///   toward clients    198.51.100.0/24, 2001:db8:1::/64
///   toward endpoints  203.0.113.0/24,  2001:db8:2::/64
final class RoutedScratchNamespace {
    let name = "l4lb-kr-unit-\(getpid())"

    init(forwarding: Bool = true) throws {
        _ = try? Self.ip(["netns", "del", name])
        try Self.ip(["netns", "add", name])
        let setup: [[String]] = [
            ["link", "set", "lo", "up"],
            ["link", "add", "toclients", "type", "veth", "peer", "name", "clients"],
            ["link", "add", "toendpoints", "type", "veth", "peer", "name", "endpoints"],
            ["addr", "add", "198.51.100.1/24", "dev", "toclients"],
            ["addr", "add", "2001:db8:1::1/64", "dev", "toclients", "nodad"],
            ["addr", "add", "203.0.113.1/24", "dev", "toendpoints"],
            ["addr", "add", "2001:db8:2::1/64", "dev", "toendpoints", "nodad"],
            ["link", "set", "clients", "up"],
            ["link", "set", "endpoints", "up"],
            ["link", "set", "toclients", "up"],
            ["link", "set", "toendpoints", "up"],
        ]
        for arguments in setup { try Self.ip(["-n", name] + arguments) }
        try setForwarding(forwarding)
    }

    deinit { _ = try? Self.ip(["netns", "del", name]) }

    /// Turns IPv4 and IPv6 forwarding on or off on every interface (`lo`, where test runs
    /// arrive, among them).
    func setForwarding(_ on: Bool) throws {
        for key in ["net.ipv4.conf.all.forwarding", "net.ipv4.conf.lo.forwarding", "net.ipv6.conf.all.forwarding"] {
            try Self.run("/usr/sbin/ip", ["netns", "exec", name, "sysctl", "-qw", "\(key)=\(on ? 1 : 0)"])
        }
    }

    /// Runs `body` on a thread inside the namespace and waits for it.
    func run<T>(_ body: @escaping () throws -> T) throws -> T {
        nonisolated(unsafe) var result: Result<T, Error>?
        nonisolated(unsafe) let work = body
        let path = "/run/netns/\(name)"
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            let entered = CTest_enter_netns(path)
            result = entered == 0 ? Result { try work() } : .failure(Failure("setns \(path): errno \(-entered)"))
            done.signal()
        }
        thread.stackSize = 8 << 20
        thread.start()
        done.wait()
        return try result!.get()
    }

    struct Failure: Error, CustomStringConvertible { let description: String; init(_ d: String) { description = d } }

    @discardableResult
    static func ip(_ arguments: [String]) throws -> String { try run("/usr/sbin/ip", arguments) }

    @discardableResult
    static func run(_ executable: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw Failure("\(executable) \(arguments.joined(separator: " ")): \(output)")
        }
        return output
    }
}
