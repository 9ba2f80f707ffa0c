import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The dashboard (issue 12), loaded in Debian's headless chromium: it shows each
/// endpoint's health and connections, follows an endpoint the test kills without being
/// reloaded, and its buttons drain an endpoint and reload the config.
final class DashboardTests: XCTestCase {
    func testDashboardShowsHealthLiveAndDrainsAnEndpoint() throws {
        let backends = try (0..<3).map { _ in try TestBackend(.echo) }
        defer { backends.forEach { $0.stop() } }
        let port = Sockets.freePort()
        let adminPort = Sockets.freePort()
        let token = "dash board;token"
        let proxy = try L4LBProcess(config: """
            admin: { address: 127.0.0.1:\(adminPort), token: "\(token)" }
            workers: 1
            listeners:
              - { name: web, address: 127.0.0.1:\(port), cluster: web }
            clusters:
              - name: web
                balancer: round_robin
                health_check: { type: tcp, interval: 200ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 2 }
                endpoints: [\(backends.map { "{ address: \"\($0.address)\" }" }.joined(separator: ", "))]
            """, waitFor: ("127.0.0.1", port))
        defer { proxy.stop() }

        // The page holds no data; everything on it comes from calls that need the token.
        let page = try proxy.admin("GET", "/")
        XCTAssertEqual(page.status, 200)
        XCTAssertEqual(page.headers["content-type"], "text/html; charset=utf-8")
        XCTAssertNil(page.headers["set-cookie"])
        XCTAssertEqual(try proxy.admin("GET", "/stats").status, 401)
        // Self-contained: nothing is fetched from anywhere but the admin API itself.
        XCTAssertNil(page.text.range(of: #"(src|href)=["']?(https?:)?//"#, options: .regularExpression), "the page loads something from outside")
        // A browser request from another origin cannot change anything, token or not.
        let crossSite = try AdminHTTP.request(port: adminPort, "POST", "/reload", token: token, headers: ["Origin": "http://127.0.0.1:8000"])
        XCTAssertEqual(crossSite.status, 403, crossSite.text)
        let fetchedCrossSite = try AdminHTTP.request(port: adminPort, "POST", "/reload", token: token, headers: ["Sec-Fetch-Site": "same-site"])
        XCTAssertEqual(fetchedCrossSite.status, 403, fetchedCrossSite.text)

        // Six connections held open: two per endpoint (round robin over three).
        let held = try (0..<6).map { _ -> Int32 in
            let fd = try Sockets.connect(port: port)
            Sockets.setTimeout(fd, seconds: 5)
            try Sockets.sendAll(fd, Array("hi".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, 2), Array("hi".utf8))
            return fd
        }
        defer { held.forEach { close($0) } }

        let browser = try HeadlessChromium()
        func cell(_ address: String, _ column: String) -> String? {
            (try? browser.evaluate(#"document.querySelector('[data-endpoint="web/\#(address)"] .\#(column)')?.textContent ?? null"#)) as? String
        }
        func text(_ id: String) -> String { ((try? browser.evaluate("document.getElementById('\(id)')?.textContent ?? ''")) as? String) ?? "" }
        // Without the token (or with a wrong one) the page shows nothing and asks for it.
        try browser.navigate("http://127.0.0.1:\(adminPort)/#token=wrong")
        XCTAssertTrue(waitUntil(timeout: 10) { text("status") == "not authorised" && text("message").contains("needs its token") }, text("status"))
        XCTAssertNil(cell(backends[0].address, "state"))
        // With it (in the fragment: never sent to a server), the page works and forgets the URL.
        try browser.navigate("http://127.0.0.1:\(adminPort)/#token=\(token.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!)")
        XCTAssertTrue(waitUntil(timeout: 10) { ((try? browser.evaluate("location.href")) as? String) == "http://127.0.0.1:\(adminPort)/" })
        let addresses = backends.map(\.address)
        XCTAssertTrue(waitUntil(timeout: 10) { addresses.allSatisfy { cell($0, "state") == "healthy" && cell($0, "active") == "2" } },
                      "page shows: \(addresses.map { "\(cell($0, "state") ?? "nil")/\(cell($0, "active") ?? "nil")" })")

        // Killed: the page turns it unhealthy by itself (it polls; nothing reloads it).
        // A mark in this document: a reload of the page would lose it.
        XCTAssertEqual(try browser.evaluate("window.l4lbTestMark = 42") as? Int, 42)
        backends[2].stop()
        XCTAssertTrue(waitUntil(timeout: 10) { cell(addresses[2], "state") == "unhealthy" }, "state: \(cell(addresses[2], "state") ?? "nil")")
        XCTAssertEqual(try browser.evaluate("window.l4lbTestMark ?? 0") as? Int, 42, "the page was reloaded")
        XCTAssertEqual(cell(addresses[0], "state"), "healthy")

        // The drain button drains it: l4lb says so, the page shows it, new connections avoid it.
        XCTAssertEqual(try browser.evaluate(#"document.querySelector('[data-endpoint="web/\#(addresses[0])"] button.drain').click(), true"#) as? Bool, true)
        XCTAssertTrue(waitUntil(timeout: 5) { (try? proxy.stats(token: token))?.endpoint(cluster: "web", address: addresses[0])?.bool("draining") == true })
        XCTAssertTrue(waitUntil(timeout: 5) { cell(addresses[0], "state") == "draining" })
        // Connections with data: a draining endpoint is still health-checked (tcp, every 200 ms).
        let acceptedBefore = backends[0].dataConnections
        for _ in 0..<10 {
            let fd = try Sockets.connect(port: port)
            Sockets.setTimeout(fd, seconds: 5)
            try Sockets.sendAll(fd, Array("x".utf8))
            XCTAssertEqual(try Sockets.receiveExactly(fd, 1), Array("x".utf8))
            close(fd)
        }
        XCTAssertEqual(backends[0].dataConnections, acceptedBefore, "a drained endpoint got new connections")
        XCTAssertEqual(cell(addresses[0], "active"), "2", "its open connections stay")

        // The reload button.
        XCTAssertEqual(try browser.evaluate("document.getElementById('reload').click(), true") as? Bool, true)
        XCTAssertTrue(waitUntil(timeout: 10) {
            ((try? browser.evaluate("document.getElementById('message').textContent")) as? String ?? "").contains("reloaded: generation 2")
        })

        let png = try browser.screenshot()
        XCTAssertEqual(Array(png.prefix(8)), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        if let path = ProcessInfo.processInfo.environment["L4LB_DASHBOARD_SCREENSHOT"] {
            try png.write(to: URL(fileURLWithPath: path))
        }
    }
}
