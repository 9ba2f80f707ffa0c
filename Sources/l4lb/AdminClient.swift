import ArgumentParser
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Options every admin command takes (DESIGN §6).
struct AdminOptions: ParsableArguments {
    @Option(name: .long, help: "The admin API's base URL.")
    var admin: String = "http://127.0.0.1:9901"

    @Option(name: .long, help: "Bearer token for the admin API (default: $L4LB_ADMIN_TOKEN).")
    var token: String?
}

/// A small client for l4lb's admin API; every failure becomes a sentence for the operator
/// and exit status 1.
struct AdminClient {
    let base: String
    let token: String?

    init(_ options: AdminOptions) {
        base = options.admin.hasSuffix("/") ? String(options.admin.dropLast()) : options.admin
        token = options.token ?? ProcessInfo.processInfo.environment["L4LB_ADMIN_TOKEN"]
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// The status and body of `method path`; throws when the API cannot be reached or
    /// refuses the token.
    func request(_ method: String, _ path: String, json: [String: Any]? = nil) async throws -> (status: Int, body: Data) {
        guard let url = URL(string: base + path) else { throw Failure(description: "not a URL: \(base + path)") }
        var request = URLRequest(url: url, timeoutInterval: 60)
        request.httpMethod = method
        if let json {
            request.httpBody = try JSONSerialization.data(withJSONObject: json)
            request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        }
        if let token { request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
        let data: Data
        let response: URLResponse
        do {
            (data, response) = try await URLSession.shared.data(for: request)
        } catch {
            throw Failure(description: "cannot reach the admin API at \(base): \(error.localizedDescription) (is l4lb running, and is admin.address \(url.host ?? "")\(url.port.map { ":\($0)" } ?? "")?)")
        }
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        if status == 401 {
            throw Failure(description: token == nil
                ? "the admin API at \(base) requires a token: pass --token or set L4LB_ADMIN_TOKEN"
                : "the admin API at \(base) refused the token (401)")
        }
        return (status, data)
    }

    static func object(_ data: Data) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:]
    }
}

/// Runs an admin command's body, printing a failure to stderr with exit status 1.
func runAdmin(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let failure as AdminClient.Failure {
        FileHandle.standardError.write(Data("l4lb: \(failure.description)\n".utf8))
        throw ExitCode(1)
    }
}
