import Hummingbird

/// Who may use the admin API, checked before any route runs:
/// 1. **Host.** A browser sends the name it resolved, so a page on a name that an attacker
///    re-points at 127.0.0.1 (DNS rebinding) arrives with that name in `Host`, and the
///    browser treats it as same-origin. Only IP literals, `localhost` and the names in
///    `admin.allowed_hosts` are answered; `/healthz` alone answers any Host.
/// 2. **Cross-site.** A state-changing request a browser marks as coming from another
///    origin (`Origin`, `Sec-Fetch-Site`) is refused even without a token; without a token,
///    a state-changing request must also name a loopback Host.
/// 3. **Token.** Every route but `/healthz` and the dashboard page needs `Authorization:
///    Bearer TOKEN` when the running config sets one (read per request, so a reload can
///    rotate it). The page itself holds no data: it sends the token the operator gives it
///    with each call, from the tab's sessionStorage; no cookie is ever set, so another page
///    in the same browser cannot make authenticated calls on the operator's behalf.
struct AdminAccessMiddleware<Context: RequestContext>: RouterMiddleware {
    let pool: WorkerPool

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // The route runs on the API's own thread at nice 10, not on Swift's shared pool.
        try await withTaskExecutorPreference(AdminThreads.taskExecutor) {
            try await check(request, context: context, next: next)
        }
    }

    private func check(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        if path == "/healthz" { return try await next(request, context) }
        let admin = pool.snapshot.config.admin
        let host = request.head.authority ?? request.headers[values: .init("Host")!].first
        let hostName = host.map(AdminAccessMiddleware.hostName)
        if let hostName, !AdminAccessMiddleware.isAllowed(hostName, admin: admin) {
            return AdminAPI.json(["error": "Host \"\(hostName)\" is not this API's: use an IP address or localhost, or add the name to admin.allowed_hosts"],
                                 status: .misdirectedRequest)
        }
        let changesState = request.method != .get && request.method != .head
        if changesState, isCrossSite(request, host: host ?? "") {
            return AdminAPI.json(["error": "cross-site request refused"], status: .forbidden)
        }
        guard let token = admin.token else {
            if changesState, let hostName, !AdminAccessMiddleware.isLoopbackName(hostName), !admin.allowedHosts.contains(hostName) {
                return AdminAPI.json(["error": "without admin.token, changes are taken only from a loopback Host"], status: .forbidden)
            }
            return try await next(request, context)
        }
        guard path != "/" else { return try await next(request, context) }
        let presented = request.headers[.authorization] ?? ""
        guard constantTimeEqual(presented, "Bearer \(token)") else {
            var response = AdminAPI.json(["error": "missing or wrong bearer token"], status: .unauthorized)
            response.headers[.wwwAuthenticate] = "Bearer realm=\"l4lb\""
            return response
        }
        return try await next(request, context)
    }

    /// `Host` without its port, lowercased; an IPv6 literal without its brackets.
    static func hostName(_ host: String) -> String {
        let lower = host.lowercased()
        if lower.hasPrefix("["), let close = lower.firstIndex(of: "]") {
            return String(lower[lower.index(after: lower.startIndex)..<close])
        }
        if let colon = lower.lastIndex(of: ":"), lower.firstIndex(of: ":") == colon { return String(lower[..<colon]) }
        return lower
    }

    /// An IP literal cannot be re-pointed; a name can, unless the operator vouches for it.
    static func isAllowed(_ name: String, admin: Config.Admin) -> Bool {
        name == "localhost" || SocketAddress.parseIP(name) != nil || admin.allowedHosts.contains(name)
    }

    static func isLoopbackName(_ name: String) -> Bool {
        if name == "localhost" { return true }
        guard let ip = SocketAddress.parseIP(name) else { return false }
        return SocketAddress(ip: ip, port: 1).isLoopback
    }

    /// A browser's request from a page that is not this API's own origin.
    private func isCrossSite(_ request: Request, host: String) -> Bool {
        if let site = request.headers[values: .init("Sec-Fetch-Site")!].first, site != "same-origin", site != "none" {
            return true
        }
        guard let origin = request.headers[values: .init("Origin")!].first else { return false }
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
