import CTestSupport
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// A network namespace a test creates (`ip netns add`) and deletes. `run` executes a body
/// on a thread that has entered it: sockets that body opens, and processes it starts
/// (l4lb, the CLI), live in the namespace; the mount namespace stays the test's, so l4lb
/// pins its maps in the host's bpffs.
final class NetworkNamespace {
    let name: String

    init(_ tag: String) throws {
        name = "l4lb-\(tag)-\(getpid())"
        _ = try? NetworkNamespace.ip(["netns", "del", name])
        try NetworkNamespace.ip(["netns", "add", name])
        try ip(["link", "set", "lo", "up"])
    }

    deinit {
        _ = try? NetworkNamespace.ip(["netns", "del", name])
    }

    /// `ip -n NAME ARGS`.
    @discardableResult
    func ip(_ arguments: [String]) throws -> String {
        try NetworkNamespace.ip(["-n", name] + arguments)
    }

    @discardableResult
    static func ip(_ arguments: [String]) throws -> String {
        let result = try ChildProcess.run("/usr/sbin/ip", arguments)
        guard result.status == 0 else { throw Sockets.Failure("ip \(arguments.joined(separator: " ")): \(result.output)", 0) }
        return result.output
    }

    /// Runs `body` on a thread inside the namespace and waits for it.
    func run<T>(_ body: () throws -> T) throws -> T {
        try withoutActuallyEscaping(body) { body in
            // The thread drops the body before it signals: it must not outlive this call.
            let box = UncheckedBox<(body: (() throws -> T)?, result: Result<T, Error>?)>((body, nil))
            let path = "/run/netns/\(name)"
            let done = DispatchSemaphore(value: 0)
            let thread = Thread {
                let entered = CTest_enter_netns(path)
                if entered != 0 {
                    box.value.result = .failure(Sockets.Failure("setns \(path)", -entered))
                } else {
                    box.value.result = Result { try box.value.body!() }
                }
                box.value.body = nil
                done.signal()
            }
            thread.stackSize = 8 << 20
            thread.start()
            done.wait()
            return try box.value.result!.get()
        }
    }

    /// A client namespace (l4c: 192.0.2.1, .3, .4, 2001:db8::1, ::3) and l4lb's (l4s:
    /// 192.0.2.2, 2001:db8::2) joined by a veth pair.
    static func vethPair(_ tag: String) throws -> (client: NetworkNamespace, server: NetworkNamespace) {
        let client = try NetworkNamespace("\(tag)-c")
        let server = try NetworkNamespace("\(tag)-s")
        try client.ip(["link", "add", "l4c", "type", "veth", "peer", "name", "l4s", "netns", server.name])
        for address in ["192.0.2.1/24", "192.0.2.3/24", "192.0.2.4/24"] { try client.ip(["addr", "add", address, "dev", "l4c"]) }
        for address in ["2001:db8::1/64", "2001:db8::3/64"] { try client.ip(["addr", "add", address, "dev", "l4c", "nodad"]) }
        try server.ip(["addr", "add", "192.0.2.2/24", "dev", "l4s"])
        try server.ip(["addr", "add", "2001:db8::2/64", "dev", "l4s", "nodad"])
        try client.ip(["link", "set", "l4c", "up"])
        try server.ip(["link", "set", "l4s", "up"])
        return (client, server)
    }

    /// The XDP program id attached to `interface`, or nil (from `ip link show`).
    func xdpProgramID(_ interface: String) throws -> Int? {
        let text = try ip(["link", "show", "dev", interface])
        guard let range = text.range(of: #"prog/xdp id (\d+)"#, options: .regularExpression) else { return nil }
        return Int(text[range].split(separator: " ").last!)
    }
}

final class UncheckedBox<Value>: @unchecked Sendable {
    var value: Value
    init(_ value: Value) { self.value = value }
}
