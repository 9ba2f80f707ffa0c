import Foundation
import Hummingbird
import HummingbirdCore
import NIOCore
import NIOPosix
import Logging

/// The admin HTTP API (DESIGN §6), a Hummingbird application run as a `Service` in the
/// process's ServiceGroup, on threads of its own (`AdminThreads`, never a worker's). It
/// reads the workers' counters with relaxed loads and changes the data plane only through
/// the control plane (`WorkerPool.reload`, `setDraining`), which blocks — so those run on
/// the admin control thread, off the event loop.
public enum AdminAPI {
    public static func application(pool: WorkerPool, logger: Logger) -> some ApplicationProtocol {
        let router = Router()
        router.add(middleware: AdminAccessMiddleware(pool: pool))
        router.get("/healthz") { _, _ in "ok\n" }
        router.get("/") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
                     body: .init(byteBuffer: ByteBuffer(string: DashboardPage.html)))
        }
        let admin = pool.snapshot.config.admin
        let budget = AdminConnectionBudget(.init(
            maximum: admin.maxConnections, idleTimeout: .milliseconds(admin.idleTimeout.milliseconds),
            requestTimeout: .milliseconds(admin.requestTimeout.milliseconds), maximumBody: Config.Admin.maximumBody))
        router.get("/stats") { _, _ in
            var document = pool.statsDocument()
            document["admin"] = budget.document
            return json(document)
        }
        router.get("/config") { _, _ in json(pool.snapshot.config.document) }
        router.get("/discovery") { _, _ in json(pool.discoveryDocument()) }
        let metrics = MetricsExporter(pool: pool)
        router.get("/metrics") { _, _ in
            var buffer = ByteBuffer()
            buffer.writeBytes(metrics.scrape())
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"], body: .init(byteBuffer: buffer))
        }
        router.post("/reload") { _, _ in
            let outcome = await offEventLoop { pool.reload(trigger: "POST /reload") }
            return json(outcome.document, status: outcome.succeeded ? .ok : .badRequest, see: "docs/configuration.md")
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
        let address = admin.address
        // Headers are a few hundred bytes from any real client; 16 KiB bounds what one
        // request can make the decoder hold.
        let decoder = HTTP1Channel.Configuration.DecoderConfiguration(maxHeaderFieldSize: 16 * 1024, maxHeaderListSize: 16 * 1024, maxHeaderFieldCount: 100)
        return Application(
            router: router,
            server: .http1(configuration: .init(additionalChannelHandlers: [budget.makeGuard()], httpDecoderConfiguration: decoder)),
            // A deep accept queue: under a connection flood a client waits in it rather than
            // having its SYN dropped and retried a second later.
            configuration: .init(address: .hostname(address.ipString, port: Int(address.port)), serverName: "l4lb", backlog: 4096),
            onServerRunning: { channel in
                // A connection that sends nothing is never queued for accept (nor takes a
                // descriptor) until its first bytes arrive, or for a few seconds at most.
                let deferAccept = ChannelOptions.Types.SocketOption(level: SocketOptionLevel(IPPROTO_TCP), name: SocketOptionName(TCP_DEFER_ACCEPT))
                try? await channel.setOption(deferAccept, value: SocketOptionValue(admin.idleTimeout.milliseconds / 1000 + 1))
                logger.info("admin API listening", metadata: ["address": "\(address)", "max_connections": "\(admin.maxConnections)"])
            },
            eventLoopGroupProvider: .shared(AdminThreads.eventLoopGroup),
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

    /// Runs blocking control-plane work on the admin control thread (`AdminThreads`).
    static func offEventLoop<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await AdminThreads.control.run(body)
    }

    /// A refusal (status 400 and up) says where to read on: `see`, the admin API's page of
    /// the docs unless the caller names another.
    static func json(_ object: [String: Any], status: HTTPResponse.Status = .ok, see page: String = "docs/admin-api.md") -> Response {
        var object = object
        if status.code >= 400 { object["see"] = page }
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted])) ?? Data("{}".utf8)
        var buffer = ByteBuffer()
        buffer.writeBytes(data)
        buffer.writeString("\n")
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: buffer))
    }
}
