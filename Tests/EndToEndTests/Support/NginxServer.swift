import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Debian's nginx serving HTTP (or HTTPS with `tls`'s certificate and key) on a free
/// loopback port, with `locations` as its one server block's body; stopped when released.
final class NginxServer {
    let port: UInt16
    private let directory: URL
    private let process: ChildProcess

    init(http locations: String, tls: (cert: String, key: String)? = nil) throws {
        port = Sockets.freePort()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("nginx-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let config = directory.appendingPathComponent("nginx.conf")
        try """
            worker_processes 1; daemon off; pid \(directory.path)/nginx.pid; error_log stderr error;
            events { worker_connections 1024; }
            http { access_log off; server { listen 127.0.0.1:\(port)\(tls == nil ? "" : " ssl");
                \(tls.map { "ssl_certificate \($0.cert); ssl_certificate_key \($0.key);" } ?? "") \(locations) } }
            """.write(to: config, atomically: true, encoding: .utf8)
        process = try ChildProcess("/usr/sbin/nginx", ["-e", "stderr", "-p", directory.path, "-c", config.path])
        let port = port
        guard waitUntil(timeout: 5, { (try? Sockets.connect(port: port, timeout: 0.5)).map { close($0); return true } ?? false }) else {
            throw Sockets.Failure("nginx did not start on \(port)", 0)
        }
    }

    deinit {
        process.terminate()
        process.wait()
        try? FileManager.default.removeItem(at: directory)
    }
}
