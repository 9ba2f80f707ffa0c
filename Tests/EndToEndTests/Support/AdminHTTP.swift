import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A minimal HTTP/1.1 client for l4lb's admin API: one request per connection
/// (`Connection: close`), the response read to EOF.
enum AdminHTTP {
    struct Response {
        let status: Int
        let headers: [String: String]
        let body: [UInt8]

        var text: String { String(decoding: body, as: UTF8.self) }
        var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:] }
    }

    static func request(host: String = "127.0.0.1", port: UInt16, _ method: String, _ path: String, token: String? = nil,
                        headers extra: [String: String] = [:], body: String = "", connectTimeout: TimeInterval = 5) throws -> Response {
        let fd = try Sockets.connect(host: host, port: port, timeout: connectTimeout)
        defer { close(fd) }
        Sockets.setTimeout(fd, seconds: 30)
        // `headers` may name its own Host (a browser's, for the rebinding tests).
        var head = "\(method) \(path) HTTP/1.1\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n"
        if extra["Host"] == nil { head += "Host: \(host):\(port)\r\n" }
        if let token { head += "Authorization: Bearer \(token)\r\n" }
        for (name, value) in extra { head += "\(name): \(value)\r\n" }
        head += "\r\n" + body
        try Sockets.sendAll(fd, Array(head.utf8))
        let raw = try Sockets.receiveAll(fd)
        guard let split = raw.indices.first(where: { i in i + 3 < raw.count && raw[i...(i + 3)].elementsEqual([13, 10, 13, 10]) }) else {
            throw Sockets.Failure("admin response without a header end: \(String(decoding: raw, as: UTF8.self))", 0)
        }
        let lines = String(decoding: raw[..<split], as: UTF8.self).components(separatedBy: "\r\n")
        let parts = lines.first?.split(separator: " ") ?? []
        guard parts.count >= 2, let status = Int(parts[1]) else { throw Sockets.Failure("bad status line \(lines.first ?? "")", 0) }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Array(raw[(split + 4)...])
        if headers["transfer-encoding"] == "chunked" { body = dechunk(body) }
        return Response(status: status, headers: headers, body: body)
    }

    static func dechunk(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            guard let end = (i..<(bytes.count - 1)).first(where: { bytes[$0] == 13 && bytes[$0 + 1] == 10 }) else { break }
            let size = Int(String(decoding: bytes[i..<end], as: UTF8.self).split(separator: ";")[0], radix: 16) ?? 0
            if size == 0 { break }
            out += bytes[(end + 2)..<min(end + 2 + size, bytes.count)]
            i = end + 2 + size + 2
        }
        return out
    }
}

/// Reading `/stats` documents.
extension Dictionary where Key == String, Value == Any {
    func listener(_ name: String) -> [String: Any]? {
        (self["listeners"] as? [[String: Any]])?.first { $0["name"] as? String == name }
    }

    func endpoint(cluster: String, address: String) -> [String: Any]? {
        let clusters = self["clusters"] as? [[String: Any]] ?? []
        let endpoints = clusters.first { $0["name"] as? String == cluster }?["endpoints"] as? [[String: Any]] ?? []
        return endpoints.first { $0["address"] as? String == address }
    }

    func int(_ key: String) -> Int { (self[key] as? NSNumber)?.intValue ?? -1 }
    func bool(_ key: String) -> Bool? { (self[key] as? NSNumber)?.boolValue }
}
