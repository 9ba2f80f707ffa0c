import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Debian's nsd serving `example.test` on loopback (IPv4 and IPv6) with response-rate
/// limiting off: `hostN.example.test` answers A 192.0.2.(N+1) for N in 0..<100.
final class NSDServer {
    let port: UInt16
    let directory: URL
    private let process: ChildProcess

    init() throws {
        port = Sockets.freePort()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("l4lb-nsd-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var zone = """
            $ORIGIN example.test.
            $TTL 300
            @ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 300
            @ IN NS ns.example.test.
            ns IN A 192.0.2.254

            """
        for n in 0..<100 { zone += "host\(n) IN A 192.0.2.\(n + 1)\n" }
        try zone.write(to: directory.appendingPathComponent("example.test.zone"), atomically: true, encoding: .utf8)
        let d = directory.path
        try """
            server:
              ip-address: 127.0.0.1@\(port)
              ip-address: ::1@\(port)
              port: \(port)
              username: ""
              chroot: ""
              zonesdir: "\(d)"
              pidfile: "\(d)/nsd.pid"
              xfrdfile: "\(d)/xfrd.state"
              zonelistfile: "\(d)/zone.list"
              database: ""
              logfile: "\(d)/nsd.log"
              verbosity: 1
              server-count: 1
              rrl-ratelimit: 0
              refuse-any: no
            remote-control:
              control-enable: no
            zone:
              name: example.test
              zonefile: example.test.zone
            """.write(to: directory.appendingPathComponent("nsd.conf"), atomically: true, encoding: .utf8)
        process = try ChildProcess("/usr/sbin/nsd", ["-d", "-c", directory.appendingPathComponent("nsd.conf").path],
                                   stdout: directory.appendingPathComponent("out.log").path, stderr: directory.appendingPathComponent("out.log").path)
        // Up when it answers a query directly.
        let probe = DNS.query(id: 1, name: "host0.example.test")
        let up = waitUntil(timeout: 10) {
            guard let fd = try? UDPClient.connect(host: "127.0.0.1", port: self.port, timeout: 0.2) else { return false }
            defer { close(fd) }
            _ = send(fd, probe, probe.count, 0)
            var buffer = [UInt8](repeating: 0, count: 512)
            return recv(fd, &buffer, buffer.count, 0) > 0
        }
        guard up else {
            let log = (try? String(contentsOf: directory.appendingPathComponent("out.log"), encoding: .utf8)) ?? ""
            throw Sockets.Failure("nsd did not start: \(log)", 0)
        }
    }

    deinit {
        process.terminate()
        process.wait()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Just enough DNS for the tests: an A query, and the id, rcode and first A record of an
/// answer.
enum DNS {
    static func query(id: UInt16, name: String) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") {
            bytes.append(UInt8(label.utf8.count))
            bytes += label.utf8
        }
        return bytes + [0, 0, 1, 0, 1]
    }

    /// (id, rcode, the first A record's address) of a response.
    static func answer(_ bytes: [UInt8]) -> (id: UInt16, rcode: Int, address: String?)? {
        guard bytes.count >= 12 else { return nil }
        let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
        let rcode = Int(bytes[3] & 0x0F)
        let questions = Int(bytes[4]) << 8 | Int(bytes[5])
        let answers = Int(bytes[6]) << 8 | Int(bytes[7])
        var i = 12
        func skipName() {
            while i < bytes.count {
                let length = Int(bytes[i])
                if length == 0 { i += 1; return }
                if length & 0xC0 == 0xC0 { i += 2; return }
                i += 1 + length
            }
        }
        for _ in 0..<questions { skipName(); i += 4 }
        for _ in 0..<answers {
            skipName()
            guard i + 10 <= bytes.count else { break }
            let type = Int(bytes[i]) << 8 | Int(bytes[i + 1])
            let length = Int(bytes[i + 8]) << 8 | Int(bytes[i + 9])
            i += 10
            if type == 1, length == 4, i + 4 <= bytes.count {
                return (id, rcode, bytes[i..<(i + 4)].map(String.init).joined(separator: "."))
            }
            i += length
        }
        return (id, rcode, nil)
    }
}
