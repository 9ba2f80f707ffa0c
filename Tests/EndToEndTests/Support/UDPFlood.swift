import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// A datagram flood from several client sockets (one thread each), and TCP round trips
/// measured beside it: the must-show 6 load, for the user-space and the kernel relay.
enum UDPFlood {
    /// One worker with a UDP listener `name` at the slow backend (`extra` added to it)
    /// and a TCP listener to the echo backend, the two sharing the worker.
    static func config(_ name: String, udpPort: UInt16, tcpPort: UInt16, slow: UDPBackend, echo: TestBackend, extra: String = "") -> String {
        """
        workers: 1
        listeners:
          - { name: \(name), address: 127.0.0.1:\(udpPort), protocol: udp, cluster: slow\(extra) }
          - { name: tcp, address: 127.0.0.1:\(tcpPort), cluster: echo }
        clusters:
          - { name: slow, endpoints: [{ address: "\(slow.address)" }] }
          - { name: echo, endpoints: [{ address: "127.0.0.1:\(echo.port)" }] }
        """
    }

    /// Starts sending `total` 64-byte datagrams, split over `sockets`; `done` is left
    /// when every thread has sent its share, and `sent` counts the sends that succeeded.
    static func start(_ sockets: [Int32], total: Int) -> (done: DispatchGroup, sent: ManagedCounter) {
        let done = DispatchGroup()
        let sent = ManagedCounter()
        for (s, fd) in sockets.enumerated() {
            done.enter()
            Thread.detachNewThread {
                defer { done.leave() }
                var payload = [UInt8](repeating: UInt8(truncatingIfNeeded: s), count: 64)
                var count = 0
                for i in 0..<(total / sockets.count) {
                    payload[1] = UInt8(truncatingIfNeeded: i)
                    if send(fd, payload, payload.count, 0) == payload.count { count += 1 }
                }
                sent.add(count)
            }
        }
        return (done, sent)
    }

    /// 1 KiB echo round trips on `port` until `done`, each checked; how many, and the
    /// slowest. `every50` runs after every 50th.
    static func roundTrips(port: UInt16, until done: DispatchGroup, every50: () -> Void = {}) throws -> (count: Int, slowest: TimeInterval) {
        let tcp = try Sockets.connect(port: port)
        defer { close(tcp) }
        Sockets.setTimeout(tcp, seconds: 2)
        var count = 0, slowest = 0.0
        let message = [UInt8](repeating: 0x5A, count: 1024)
        while done.wait(timeout: .now()) == .timedOut {
            let t = Date()
            try Sockets.sendAll(tcp, message)
            XCTAssertEqual(try Sockets.receiveExactly(tcp, message.count), message, "round trip \(count)")
            slowest = max(slowest, Date().timeIntervalSince(t))
            count += 1
            if count % 50 == 0 { every50() }
        }
        return (count, slowest)
    }
}
