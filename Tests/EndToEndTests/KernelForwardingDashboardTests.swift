import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The dashboard's kernel columns (issue 35), in Debian's headless chromium: a kernel
/// listener's and its endpoint's flows and bytes, as the kernel counted them.
final class KernelForwardingDashboardTests: XCTestCase {
    typealias Address = RoutedTopology.Address

    /// 20 kernel flows, each echoing 1 KiB: the listener's row shows 20 of 20 flows and
    /// 20 KiB each way, so does the endpoint's; a proxied listener beside it shows dashes.
    func testTheDashboardShowsKernelFlowsAndBytes() throws {
        let topology = try RoutedTopology("kfb")
        let backend = try topology.endpoint.run { try TestBackend(.echo, host: Address.endpoint4) }
        defer { backend.stop() }
        let adminPort = Sockets.freePort()
        let config = """
            admin: { address: 127.0.0.1:\(adminPort) }
            workers: 1
            kernel_relay: { interfaces: [l4b-c, l4b-e] }
            listeners:
              - { name: fast4, address: \(Address.listener4):80, cluster: web4, relay: kernel, idle_timeout: 120s }
              - { name: slow4, address: \(Address.listener4):81, cluster: web4 }
            clusters:
              - { name: web4, balancer: maglev, endpoints: [{ address: \(Address.endpoint4):\(backend.port) }] }
            """
        let proxy = try topology.balancer.run { try L4LBProcess(config: config, waitFor: nil) }
        defer { proxy.stop() }
        XCTAssertTrue(waitUntil(timeout: 30) { (try? topology.balancer.run { try proxy.stats() }) != nil }, "l4lb did not start: \(proxy.log)")

        let flows = try KernelForwardingOperationsTests.open(topology, 20)
        defer { flows.forEach { close($0) } }

        let browser = try topology.balancer.run { try HeadlessChromium() }
        try browser.navigate("http://127.0.0.1:\(adminPort)/")
        func cell(_ row: String, _ column: String) -> String? {
            (try? browser.evaluate(#"document.querySelector('\#(row) .\#(column)')?.textContent ?? null"#)) as? String
        }
        let listener = #"[data-listener="fast4"]"#, endpoint = #"[data-endpoint="web4/\#(Address.endpoint4):\#(backend.port)"]"#
        // flows_active is as of the forwarder's last sweep: within seconds.
        XCTAssertTrue(waitUntil(timeout: 15) { cell(listener, "kernel-flows") == "20 / 20" && cell(endpoint, "kernel-flows") == "20 / 20" },
                      "listener \(cell(listener, "kernel-flows") ?? "nil"), endpoint \(cell(endpoint, "kernel-flows") ?? "nil")")
        XCTAssertEqual(cell(listener, "kernel-bytes"), "20.0 KiB / 20.0 KiB")
        XCTAssertEqual(cell(endpoint, "kernel-bytes"), "20.0 KiB / 20.0 KiB")
        XCTAssertEqual(cell(#"[data-listener="slow4"]"#, "kernel-flows"), "-", "a proxied listener has no kernel flows")
    }
}
