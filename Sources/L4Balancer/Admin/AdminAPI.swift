import Foundation
import Hummingbird
import Logging

/// The admin HTTP API (DESIGN §6), a Hummingbird application run as a `Service` in the
/// process's ServiceGroup, on Hummingbird's own event loops (never a worker thread). It
/// reads the workers' counters with relaxed loads and changes the data plane only through
/// the control plane (`WorkerPool.reload`, `setDraining`), which blocks — so those run on
/// a dispatch queue, off the event loops.
public enum AdminAPI {
    public static func application(pool: WorkerPool, logger: Logger) -> some ApplicationProtocol {
        let router = Router()
        router.add(middleware: BearerTokenMiddleware(pool: pool))
        router.get("/healthz") { _, _ in "ok\n" }
        router.get("/") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
                     body: .init(byteBuffer: ByteBuffer(string: DashboardPage.html)))
        }
        router.get("/stats") { _, _ in json(pool.statsDocument()) }
        router.get("/config") { _, _ in json(pool.snapshot.config.document) }
        let metrics = MetricsExporter(pool: pool)
        router.get("/metrics") { _, _ in
            var buffer = ByteBuffer()
            buffer.writeBytes(metrics.scrape())
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"], body: .init(byteBuffer: buffer))
        }
        router.post("/reload") { _, _ in
            let outcome = await offEventLoop { pool.reload(trigger: "POST /reload") }
            return json(outcome.document, status: outcome.succeeded ? .ok : .badRequest)
        }
        router.get("/blocklist") { _, _ in json(pool.blocklistDocument()) }
        router.get("/ratelimit/top") { request, _ in
            let count = request.uri.queryParameters.get("limit", as: Int.self).map { min(max($0, 1), 1000) } ?? 20
            return json(pool.rateLimitTopDocument(limit: count))
        }
        router.post("/blocklist") { request, _ in
            try await blocklist(pool: pool, request: request, adding: true)
        }
        router.delete("/blocklist") { request, _ in
            try await blocklist(pool: pool, request: request, adding: false)
        }
        router.post("/clusters/:cluster/endpoints/:address/drain") { _, context in
            try await drain(pool: pool, context: context, draining: true)
        }
        router.delete("/clusters/:cluster/endpoints/:address/drain") { _, context in
            try await drain(pool: pool, context: context, draining: false)
        }
        let address = pool.snapshot.config.admin.address
        return Application(
            router: router,
            configuration: .init(address: .hostname(address.ipString, port: Int(address.port)), serverName: "l4lb"),
            onServerRunning: { _ in logger.info("admin API listening", metadata: ["address": "\(address)"]) },
            logger: logger)
    }

    static func drain(pool: WorkerPool, context: some RequestContext, draining: Bool) async throws -> Response {
        let cluster = try context.parameters.require("cluster")
        let raw = try context.parameters.require("address")
        let address = raw.removingPercentEncoding ?? raw
        let result: Result<Void, WorkerPool.DrainError> = await offEventLoop {
            Result { () throws(WorkerPool.DrainError) in try pool.setDraining(draining, cluster: cluster, address: address) }
        }
        switch result {
        case .success:
            return json(["cluster": cluster, "endpoint": address, "draining": draining])
        case .failure(let error):
            if case .badAddress = error { return json(["error": error.description], status: .badRequest) }
            return json(["error": error.description], status: .notFound)
        }
    }

    /// `POST` / `DELETE /blocklist` with `{"entry": "192.0.2.0/24"}`.
    static func blocklist(pool: WorkerPool, request: Request, adding: Bool) async throws -> Response {
        let body = try await request.body.collect(upTo: 64 * 1024)
        let object = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any]
        guard let entry = object?["entry"] as? String else {
            return json(["error": "send {\"entry\": \"CIDR, tcp/PORT or udp/PORT\"}"], status: .badRequest)
        }
        let result = await offEventLoop { adding ? pool.block(entry) : pool.unblock(entry) }
        switch result {
        case .success(let parsed):
            return json(["entry": parsed.description, adding ? "added" : "removed": true])
        case .failure(let error):
            let status: HTTPResponse.Status = switch error.kind {
            case .invalid: .badRequest
            case .notFound: .notFound
            case .fromConfig: .conflict
            case .failed: .internalServerError
            }
            return json(["error": error.description], status: status)
        }
    }

    /// Runs blocking control-plane work on a dispatch queue.
    static func offEventLoop<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(returning: body()) }
        }
    }

    static func json(_ object: [String: Any], status: HTTPResponse.Status = .ok) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted])) ?? Data("{}".utf8)
        var buffer = ByteBuffer()
        buffer.writeBytes(data)
        buffer.writeString("\n")
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: buffer))
    }
}

/// Every endpoint but `/healthz` and the dashboard page needs `Authorization: Bearer
/// TOKEN` when the running config sets a token (read per request, so a reload can rotate
/// it). The page itself holds no data: it sends the token the operator gives it with each
/// call, from the tab's sessionStorage. No cookie is ever set, so another page in the same
/// browser cannot make authenticated calls on the operator's behalf; and a state-changing
/// request a browser marks as coming from another origin (`Origin`, `Sec-Fetch-Site`) is
/// refused even without a token, so a web page cannot reload, drain or block through a
/// loopback admin API that has none.
struct BearerTokenMiddleware<Context: RequestContext>: RouterMiddleware {
    let pool: WorkerPool

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if request.method != .get, request.method != .head, isCrossSite(request) {
            return AdminAPI.json(["error": "cross-site request refused"], status: .forbidden)
        }
        guard request.uri.path != "/healthz", request.uri.path != "/", let token = pool.snapshot.config.admin.token else {
            return try await next(request, context)
        }
        let presented = request.headers[.authorization] ?? ""
        guard constantTimeEqual(presented, "Bearer \(token)") else {
            var response = AdminAPI.json(["error": "missing or wrong bearer token"], status: .unauthorized)
            response.headers[.wwwAuthenticate] = "Bearer realm=\"l4lb\""
            return response
        }
        return try await next(request, context)
    }

    /// A browser's request from a page that is not this API's own origin.
    private func isCrossSite(_ request: Request) -> Bool {
        if let site = request.headers[values: .init("Sec-Fetch-Site")!].first, site != "same-origin", site != "none" {
            return true
        }
        guard let origin = request.headers[values: .init("Origin")!].first else { return false }
        let host = request.head.authority ?? request.headers[values: .init("Host")!].first ?? ""
        return origin != "http://\(host)"
    }

    private func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        var difference = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<min(x.count, y.count) { difference |= x[i] ^ y[i] }
        return difference == 0
    }
}
