import L4Balancer
import XCTest

/// `kernel_relay:` and `relay: kernel` on the listeners it forwards (issue 35): every setting the
/// kernel path cannot honour is refused by name, as `check`, `run` and a reload all parse.
final class KernelRelayConfigTests: XCTestCase {
    func errors(_ yaml: String) -> Set<String> {
        guard case .failure(let errors) = ConfigParser.parse(yaml: yaml) else { return [] }
        return Set(errors.errors.map(\.description))
    }

    static let base = """
        kernel_relay: { interfaces: [l4b-c, l4b-e] }
        listeners:
          - { name: fast, address: 198.51.100.1:80, cluster: web, relay: kernel LISTENER }
        clusters:
          - { name: web, balancer: maglev, endpoints: [{ address: 203.0.113.10:80 }, { address: 203.0.113.11:80 }] CLUSTER }
        """

    func config(listener: String = "", cluster: String = "", top: String = "") -> String {
        top + Self.base.replacingOccurrences(of: "LISTENER", with: listener).replacingOccurrences(of: "CLUSTER", with: cluster)
    }

    func testAKernelListenerParsesWithItsSection() throws {
        let config = try ConfigParser.parse(yaml: config().replacingOccurrences(of: "{ interfaces: [l4b-c, l4b-e] }",
                                                                                 with: "{ interfaces: [l4b-c, l4b-e], nat_ports: 62000-63999, flows: 5000 }")).get()
        XCTAssertEqual(config.kernelRelay.interfaces, ["l4b-c", "l4b-e"])
        XCTAssertEqual(config.kernelRelay.natPorts, 62000...63999)
        XCTAssertEqual(config.kernelRelay.flows, 5000)
        XCTAssertEqual(config.listeners[0].relay, .kernel)
        XCTAssertTrue(config.wantsKernelForwarding)
        XCTAssertEqual(try ConfigParser.parse(yaml: self.config()).get().kernelRelay.natPorts, 61000...65535, "outside Linux's default ip_local_port_range")
    }

    func testEverySettingTheKernelCannotHonourIsRefusedByName() {
        let cases: [(listener: String, cluster: String, expected: String)] = [
            (", tls: { certificate: /c.pem, key: /k.pem }", "", "listeners[0].relay: kernel cannot terminate TLS; remove tls or use relay: user"),
            (", proxy_protocol: v2", "", "listeners[0].relay: kernel cannot send a PROXY protocol header; set proxy_protocol: none"),
            (", max_connections: 10", "", "listeners[0].max_connections: relay: kernel bounds flows with kernel_relay.flows; remove it"),
            (", connect_attempts: 2", "", "listeners[0].connect_attempts: relay: kernel makes one attempt (the client's SYN retries); remove it"),
            (", send_timeout: 5s", "", "listeners[0].send_timeout: relay: kernel holds no bytes; remove it"),
            ("", ", slow_start: 30s", "listeners[0].relay: kernel cannot ramp weights; cluster \"web\" has slow_start: 30s"),
            ("", ", max_connections: 5", "listeners[0].relay: kernel cannot enforce max_connections of cluster \"web\""),
            (", rate_limit: { per_source: { max_connections: 5 } }", "",
             "listeners[0].rate_limit.per_source.max_connections: relay: kernel cannot count a source's open flows; use new_connections"),
        ]
        for (listener, cluster, expected) in cases {
            XCTAssertTrue(errors(config(listener: listener, cluster: cluster)).contains(expected),
                          "\(listener)\(cluster): expected \(expected) in \(errors(config(listener: listener, cluster: cluster)))")
        }
    }

    /// `on_unhealthy: close` is honoured in the kernel too (its flows are removed), so a
    /// kernel listener takes it.
    func testOnUnhealthyCloseIsAccepted() {
        XCTAssertEqual(errors(config(cluster: ", on_unhealthy: close")), [])
    }

    func testClustersAddressesAndPortsTheKernelCannotServeAreRefused() {
        let roundRobin = config().replacingOccurrences(of: "balancer: maglev", with: "balancer: round_robin")
        XCTAssertTrue(errors(roundRobin).contains("listeners[0].relay: kernel runs maglev or random; cluster \"web\" uses round_robin"))
        let loopback = config().replacingOccurrences(of: "203.0.113.11:80", with: "127.0.0.1:9001")
        XCTAssertTrue(errors(loopback).contains("clusters[0].endpoints[1].address: relay: kernel forwards to remote endpoints; 127.0.0.1:9001 is on loopback"))
        let mixed = config().replacingOccurrences(of: "203.0.113.11:80", with: "\"[2001:db8:2::11]:80\"")
        XCTAssertTrue(errors(mixed).contains("clusters[0].endpoints[1].address: relay: kernel cannot translate between IPv4 and IPv6 (listeners[0] is IPv4)"))
        let wildcard = config().replacingOccurrences(of: "198.51.100.1:80", with: "0.0.0.0:80")
        XCTAssertTrue(errors(wildcard).contains(
            "listeners[0].address: relay: kernel needs the listener's own address (a wildcard would take traffic routed through this host)"))
        let noInterfaces = config().replacingOccurrences(of: "kernel_relay: { interfaces: [l4b-c, l4b-e] }\n", with: "")
        XCTAssertEqual(errors(noInterfaces), ["kernel_relay.interfaces: required by listeners[0] (relay: kernel on tcp)"])
        let overlap = config().replacingOccurrences(of: "{ interfaces: [l4b-c, l4b-e] }", with: "{ interfaces: [l4b-c], nat_ports: 60000-65535 }")
            .replacingOccurrences(of: "198.51.100.1:80", with: "198.51.100.1:62000")
        XCTAssertTrue(errors(overlap).contains("kernel_relay.nat_ports: contains port 62000 of listeners[0]"))
        let malformed = config().replacingOccurrences(of: "{ interfaces: [l4b-c, l4b-e] }", with: "{ interfaces: [l4b-c], nat_ports: 80-90 }")
        XCTAssertTrue(errors(malformed).contains("kernel_relay.nat_ports: '80-90': expected FIRST-LAST within 1024-65535"))
        let split = config().replacingOccurrences(of: "cluster: web, relay", with: "clusters: [{ name: web, weight: 1 }], relay")
        XCTAssertTrue(errors(split).contains("listeners[0].clusters: relay: kernel sends a listener to one cluster; use cluster:"))
    }

    /// A udp listener with `relay: kernel` away from loopback is the forwarder's, with the
    /// same rules as a tcp one; on loopback it keeps the `lo` relay, which needs no section.
    func testAUDPListenerAwayFromLoopbackIsForwardedWithTheSameRules() throws {
        let udp = config(listener: ", protocol: udp")
        let parsed = try ConfigParser.parse(yaml: udp).get()
        XCTAssertTrue(parsed.listeners[0].forwardedInKernel)
        XCTAssertTrue(parsed.wantsKernelForwarding)
        XCTAssertTrue(errors(config(listener: ", protocol: udp, max_sessions: 10")).contains(
            "listeners[0].max_sessions: relay: kernel bounds flows with kernel_relay.flows; remove it"))
        XCTAssertTrue(errors(config(listener: ", protocol: udp, session: none")).contains("listeners[0].relay: kernel applies to session: client only"))
        XCTAssertTrue(errors(udp.replacingOccurrences(of: "198.51.100.1:80", with: "0.0.0.0:80")).contains(
            "listeners[0].address: relay: kernel needs the listener's own address (a wildcard would take traffic routed through this host)"))
        XCTAssertEqual(errors(udp.replacingOccurrences(of: "kernel_relay: { interfaces: [l4b-c, l4b-e] }\n", with: "")),
                       ["kernel_relay.interfaces: required by listeners[0] (relay: kernel on udp away from loopback)"])

        let loopback = try ConfigParser.parse(yaml: """
            listeners:
              - { name: dns, address: 127.0.0.1:5353, protocol: udp, cluster: dns, relay: kernel }
            clusters:
              - { name: dns, endpoints: [{ address: 127.0.0.1:5354 }] }
            """).get()
        XCTAssertFalse(loopback.listeners[0].forwardedInKernel, "the lo relay's")
        XCTAssertFalse(loopback.wantsKernelForwarding)
    }
}
