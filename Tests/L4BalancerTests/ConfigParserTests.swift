import L4Balancer
import XCTest

final class ConfigParserTests: XCTestCase {
    func parse(_ yaml: String) -> Result<Config, ConfigErrors> { ConfigParser.parse(yaml: yaml) }

    func testDefaultsAreFilledIn() throws {
        let config = try parse("""
            listeners: [{ address: "0.0.0.0:8080", cluster: web }]
            clusters: [{ name: web, endpoints: [{ address: "127.0.0.1:9001" }] }]
            """).get()
        XCTAssertEqual(config.workers, .auto)
        XCTAssertEqual(config.drainTimeout, .seconds(30))
        let listener = try XCTUnwrap(config.listeners.first)
        XCTAssertEqual(listener.name, "0.0.0.0:8080")
        XCTAssertEqual(listener.connectTimeout, .seconds(2))
        XCTAssertEqual(listener.connectAttempts, 3)
        XCTAssertEqual(listener.idleTimeout, .seconds(300))
        XCTAssertNil(listener.maxConnections, "no shared limit unless one is set")
        XCTAssertEqual(listener.sendTimeout, .seconds(30))
        XCTAssertEqual(config.buffers, Config.Buffers())
        XCTAssertEqual(config.buffers.small, 16_384)
        XCTAssertEqual(config.buffers.smallSize, 16_384)
        XCTAssertEqual(listener.proxyProtocol, .none)
        XCTAssertEqual(listener.clusters, [Config.WeightedCluster(name: "web", weight: 1)])
        XCTAssertEqual(config.clusters.first?.balancer, .roundRobin)
        XCTAssertEqual(config.clusters.first?.endpoints.first?.weight, 1)
    }

    func testFullListenerAndCanarySplit() throws {
        let config = try parse("""
            workers: 4
            drain_timeout: 500ms
            listeners:
              - name: web
                address: "[::1]:8443"
                clusters: [{ name: v1, weight: 95 }, { name: v2, weight: 5 }]
                connect_timeout: 250ms
                connect_attempts: 2
                idle_timeout: 1h
                send_timeout: 5s
                max_connections: 10
                proxy_protocol: v2
            clusters:
              - { name: v1, endpoints: [{ address: "[2001:db8::1]:80", weight: 3 }] }
              - { name: v2, endpoints: [{ address: "192.0.2.1:80" }] }
            """).get()
        XCTAssertEqual(config.workers, .count(4))
        XCTAssertEqual(config.drainTimeout.milliseconds, 500)
        let l = config.listeners[0]
        XCTAssertEqual(l.address.description, "[::1]:8443")
        XCTAssertEqual(l.clusters.map(\.weight), [95, 5])
        XCTAssertEqual(l.connectTimeout.milliseconds, 250)
        XCTAssertEqual(l.idleTimeout.milliseconds, 3_600_000)
        XCTAssertEqual(l.sendTimeout.milliseconds, 5_000)
        XCTAssertEqual(l.maxConnections, 10)
        XCTAssertEqual(l.proxyProtocol, .v2)
        XCTAssertEqual(config.clusters[0].endpoints[0].address.description, "[2001:db8::1]:80")
    }

    func testBufferPoolSizes() throws {
        let config = try parse("""
            buffers: { small: 4096, small_size: 8KiB, large: 4, large_size: 2MiB }
            listeners: [{ address: "127.0.0.1:1", cluster: c }]
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:2" }] }]
            """).get()
        XCTAssertEqual(config.buffers.small, 4096)
        XCTAssertEqual(config.buffers.smallSize, 8192)
        XCTAssertEqual(config.buffers.large, 4)
        XCTAssertEqual(config.buffers.largeSize, 2 << 20)
        guard case .failure(let errors) = parse("""
            buffers: { small: 10, small_size: 2 MiB, large_size: 2048, pool: 1 }
            listeners: [{ address: "127.0.0.1:1", cluster: c, send_timeout: soon }]
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:2" }] }]
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "buffers.pool: unknown key",
            "buffers.small: 10 out of range 64...65536",
            "buffers.small_size: expected a size such as 16384, 16KiB or 1MiB, got \"2 MiB\"",
            "buffers.large_size: 2048 bytes out of range 4096...67108864",
            "listeners[0].send_timeout: invalid duration \"soon\" (use e.g. 500ms, 2s, 5m, 1h)",
        ])
    }

    func testMisplacedAndUnsupportedKeysAreRejectedByName() {
        guard case .failure(let errors) = parse("""
            listeners: [{ address: "127.0.0.1:1", cluster: c, protocol: udp, tls: {} }]
            clusters: [{ name: c, balancer: maglev, table_size: 1000, choice_count: 2, slow_start: 1s, health_check: { type: ping }, endpoints: [{ address: "127.0.0.1:2" }], tls: { verify: true } }]
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "listeners[0].tls: applies to tcp listeners only",
            "clusters[0].tls: TLS to endpoints is for TCP, and listeners[0] is udp",
            "clusters[0].table_size: 1000 is not prime (e.g. 65537, 655373)",
            "clusters[0].choice_count: applies to balancer least_request only, not maglev",
            "clusters[0].health_check.type: must be one of tcp, send_expect, http, dns, got \"ping\"",
            "clusters[0].slow_start: applies to round_robin, random and least_request, not maglev (hashing must not move keys)",
        ])
    }

    func testUpstreamTLSSettingsAndTheirErrors() throws {
        let config = try parse("""
            listeners: [{ address: "127.0.0.1:1", cluster: c }]
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:2" }], tls: { sni: api.example.test, min_version: "1.3", alpn: [h2], session_reuse: false } }]
            """).get()
        let tls = try XCTUnwrap(config.clusters[0].tls)
        XCTAssertEqual(tls.serverName, "api.example.test")
        XCTAssertTrue(tls.verify, "verification is on unless turned off")
        XCTAssertNil(tls.caPEM, "no ca: the system's trust store")
        XCTAssertEqual(tls.minVersion, .tls13)
        XCTAssertEqual(tls.alpn, ["h2"])
        XCTAssertFalse(tls.sessionReuse)
        guard case .failure(let errors) = parse("""
            listeners:
              - { address: "127.0.0.1:1", cluster: c }
              - { address: "127.0.0.1:3", cluster: d, routes: [{ server_names: [x.example.test], cluster: d }] }
            clusters:
              - { name: c, endpoints: [{ address: "127.0.0.1:2" }], tls: { sni: "a b", ca: /nonexistent/ca.pem, client_cert: { cert: /nonexistent/c.pem }, ciphers: NOPE, check: 1 } }
              - { name: d, endpoints: [{ address: "127.0.0.1:4" }], tls: { verify: false } }
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "clusters[0].tls.check: unknown key",
            "clusters[0].tls.sni: \"a b\" is not a host name",
            "clusters[0].tls.ca: /nonexistent/ca.pem: cannot read file",
            "clusters[0].tls.client_cert.key: required",
            "clusters[0].tls.ciphers: OpenSSL accepts no cipher in \"NOPE\"",
            "clusters[1].tls: listeners[1] routes by server name and passes the client's TLS through; it cannot be wrapped in TLS again",
        ])
    }

    func testDurationsAndAddresses() {
        XCTAssertEqual(ConfigDuration.parse("5m")?.milliseconds, 300_000)
        XCTAssertEqual(ConfigDuration.parse("0")?.milliseconds, 0)
        XCTAssertNil(ConfigDuration.parse("1.5s"))
        XCTAssertNil(ConfigDuration.parse("s"))
        XCTAssertEqual(try SocketAddress.parse("[::ffff:1.2.3.4]:1").get().port, 1)
        XCTAssertEqual(SocketAddress.parse("::1:80"), .failure(.shape("::1:80")))
        XCTAssertEqual(SocketAddress.parse("1.2.3.4:0"), .failure(.port("port 0 out of range")))
    }

    func testRateLimitDefaultsInheritanceAndErrors() throws {
        let config = try parse("""
            rate_limit:
              per_source: { new_connections: { rate: 6000/m }, packets: { rate: 50000/s, burst: 100000 } }
              exempt: [203.0.113.0/24]
              table_size: 5000
            listeners:
              - { name: a, address: "127.0.0.1:1", cluster: c }
              - { name: b, address: "127.0.0.1:2", cluster: c, rate_limit: off }
              - { name: u, address: "127.0.0.1:3", protocol: udp, cluster: c }
              - name: own
                address: "127.0.0.1:4"
                cluster: c
                rate_limit: { per_source: { max_connections: 50, prefix_v4: 24, prefix_v6: 48 } }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:9" }] }]
            """).get()
        XCTAssertEqual(config.rateLimitSources, 8192, "rounded up to a power of two")
        let a = try XCTUnwrap(config.listeners[0].rateLimit)
        XCTAssertEqual(a.newConnections, Config.RateLimit.Bucket(rate: 100, burst: 100), "burst defaults to one second's worth")
        XCTAssertNil(a.packets, "packets apply to udp listeners only")
        XCTAssertEqual(a.exempt.map(\.description), ["203.0.113.0/24"])
        XCTAssertNil(config.listeners[1].rateLimit)
        XCTAssertEqual(config.listeners[2].rateLimit?.packets, Config.RateLimit.Bucket(rate: 50000, burst: 100000))
        let own = try XCTUnwrap(config.listeners[3].rateLimit)
        XCTAssertEqual(own.maxConnections, 50)
        XCTAssertNil(own.newConnections, "a listener's own rate_limit replaces the default")
        XCTAssertEqual(own.prefixV4, 24)
        XCTAssertEqual(own.prefixV6, 48)
        XCTAssertEqual(Config.RateLimit.Bucket(rate: 100, burst: 200).intervalNanoseconds, 10_000_000)

        guard case .failure(let errors) = parse("""
            listeners:
              - name: a
                address: "127.0.0.1:1"
                cluster: c
                rate_limit:
                  per_source: { new_connections: { rate: fast }, packets: { rate: 10/s }, prefix_v4: 33 }
                  exempt: [example.com]
                  table_size: 100
              - { name: p, address: "127.0.0.1:2", protocol: udp, session: none, cluster: c,
                  rate_limit: { per_source: { new_connections: { rate: 1/s } } } }
              - { name: e, address: "127.0.0.1:3", cluster: c, rate_limit: { per_source: {} } }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:9" }] }]
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "listeners[0].rate_limit.table_size: unknown key",
            "listeners[0].rate_limit.per_source.new_connections.rate: invalid rate \"fast\" (use e.g. 100/s, 6000/m, 10/h)",
            "listeners[0].rate_limit.per_source.prefix_v4: 33 out of range 1...32",
            "listeners[0].rate_limit.exempt[0]: 'example.com' is not an IP address or CIDR prefix",
            "listeners[0].rate_limit.per_source.packets: applies to udp listeners only (TCP packets are limited by new_connections)",
            "listeners[1].rate_limit.per_source.new_connections: a session: none listener has no sessions; limit its packets",
            "listeners[2].rate_limit.per_source: set at least one of new_connections, packets, max_connections",
        ])
    }

    func testFilterSection() throws {
        let config = try parse("""
            listeners: [{ address: "127.0.0.1:1", cluster: c }]
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:2" }] }]
            filter:
              xdp: { interfaces: [eth0, lo], mode: generic, pin_path: /sys/fs/bpf/edge }
              block_sources: [192.0.2.0/24, "2001:db8::/32", 198.51.100.7]
              allow_sources: [192.0.2.7]
              block_ports: [tcp/23, udp/19]
            """).get()
        XCTAssertEqual(config.filter.interfaces, ["eth0", "lo"])
        XCTAssertEqual(config.filter.mode, .generic)
        XCTAssertEqual(config.filter.pinPath, "/sys/fs/bpf/edge")
        XCTAssertEqual(config.filter.blockSources.map(\.description), ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"])
        XCTAssertEqual(config.filter.allowSources.map(\.description), ["192.0.2.7/32"])
        XCTAssertEqual(config.filter.blockPorts.map(\.description), ["tcp/23", "udp/19"])
        XCTAssertTrue(config.filter.wantsXDP)
        XCTAssertEqual(Config.Filter().pinPath, "/sys/fs/bpf/l4lb")
        XCTAssertFalse(Config.Filter().wantsXDP, "no interfaces: the lists are enforced in user space")

        guard case .failure(let errors) = parse("""
            listeners: [{ address: "127.0.0.1:1", cluster: c }]
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:2" }] }]
            filter:
              xdp: { interfaces: [eth0, eth0, "a/b"], mode: fast, pin_path: relative, attach: now }
              block_sources: [192.0.2.0/33, tcp/80, example.com]
              allow_sources: [udp/53]
              block_ports: [tcp/0, 10.0.0.1, sctp/9]
              drop: []
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "filter.drop: unknown key",
            "filter.xdp.attach: unknown key",
            "filter.xdp.interfaces[1]: eth0 is listed twice",
            "filter.xdp.interfaces[2]: 'a/b' is not an interface name",
            "filter.xdp.mode: must be one of auto, native, generic, userspace, off, got \"fast\"",
            "filter.xdp.pin_path: must be an absolute directory on a bpf filesystem",
            "filter.block_sources[0]: '192.0.2.0/33': prefix length must be 0-32",
            "filter.block_sources[1]: 'tcp/80' is a port: list it under filter.block_ports",
            "filter.block_sources[2]: 'example.com' is not an IP address or CIDR prefix",
            "filter.allow_sources[0]: 'udp/53' is a port: list it under filter.block_ports",
            "filter.block_ports[0]: 'tcp/0': port must be 1-65535",
            "filter.block_ports[1]: '10.0.0.1/32' is a source prefix, not tcp/PORT or udp/PORT",
            "filter.block_ports[2]: 'sctp/9' is not an IP address or CIDR prefix",
        ])
    }

    func testUDPListeners() throws {
        let config = try parse("""
            listeners:
              - { name: dns, address: "127.0.0.1:53", protocol: udp, cluster: c, max_sessions: 500 }
              - { name: dns-tcp, address: "127.0.0.1:53", cluster: c }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:5353" }] }]
            """).get()
        XCTAssertEqual(config.listeners[0].transport, .udp)
        XCTAssertEqual(config.listeners[0].idleTimeout, .seconds(30), "UDP sessions default to 30 s")
        XCTAssertEqual(config.listeners[0].maxSessions, 500)
        XCTAssertEqual(config.listeners[1].transport, .tcp, "TCP and UDP may share an address")
        XCTAssertEqual(config.listeners[1].idleTimeout, .seconds(300))

        guard case .failure(let errors) = parse("""
            listeners:
              - { address: "127.0.0.1:53", protocol: udp, cluster: c, connect_timeout: 1s, proxy_protocol: v2, max_sessions: 0 }
              - { address: "127.0.0.1:54", cluster: c, max_sessions: 10 }
              - { name: again, address: "127.0.0.1:53", protocol: udp, cluster: c }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:5353" }] }]
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "listeners[0].connect_timeout: applies to tcp listeners only",
            "listeners[0].proxy_protocol: applies to tcp listeners only",
            "listeners[0].max_sessions: 0 out of range 1...1000000",
            "listeners[1].max_sessions: applies to udp listeners only",
            "listeners[2].address: 127.0.0.1:53 is already used by listeners[0]",
        ])
    }

    func testUDPSessionModesAndProxyResponses() throws {
        let config = try parse("""
            listeners:
              - { name: a, address: "127.0.0.1:53", protocol: udp, cluster: c, proxy_responses: 1 }
              - { name: b, address: "127.0.0.1:54", protocol: udp, cluster: c, session: none, proxy_responses: 0 }
              - { name: d, address: "127.0.0.1:55", protocol: udp, cluster: c, session: none }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:5353" }] }]
            """).get()
        XCTAssertEqual(config.listeners.map(\.proxyResponses), [1, 0, nil])
        XCTAssertEqual(config.listeners.map(\.session), [.client, .none, .none])

        guard case .failure(let errors) = parse("""
            listeners:
              - { address: "127.0.0.1:53", protocol: udp, cluster: c, proxy_responses: 0 }
              - { address: "127.0.0.1:54", protocol: udp, cluster: c, session: sticky }
              - { address: "127.0.0.1:55", cluster: c, proxy_responses: 1 }
            clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:5353" }] }]
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "listeners[0].proxy_responses: 0 applies to session: none only",
            "listeners[1].session: must be one of client, none, got \"sticky\"",
            "listeners[2].proxy_responses: applies to udp listeners only",
        ])
    }

    func testUDPHealthChecks() throws {
        let config = try parse("""
            listeners:
              - { name: dns, address: "127.0.0.1:53", protocol: udp, cluster: dns }
              - { name: both-udp, address: "127.0.0.1:54", protocol: udp, cluster: both }
              - { name: both-tcp, address: "127.0.0.1:54", cluster: both }
              - { name: echo, address: "127.0.0.1:55", protocol: udp, cluster: echo }
            clusters:
              - { name: dns, endpoints: [{ address: "127.0.0.1:5353" }], health_check: { type: dns, query: example.test, query_type: AAAA, expected_rcode: [NOERROR, NXDOMAIN] } }
              - { name: both, endpoints: [{ address: "127.0.0.1:5353" }], health_check: { type: dns } }
              - { name: echo, endpoints: [{ address: "127.0.0.1:7" }], health_check: { type: send_expect, send_hex: "00ff", expect_hex: "00" } }
            """).get()
        XCTAssertEqual(config.clusters[0].healthCheck?.kind, .dns(query: "example.test", type: 28, rcodes: [0, 3]))
        XCTAssertEqual(config.clusters[0].healthCheck?.transport, .udp, "behind udp listeners only")
        XCTAssertEqual(config.clusters[1].healthCheck?.kind, .dns(query: ".", type: 1, rcodes: [0]))
        XCTAssertEqual(config.clusters[1].healthCheck?.transport, .tcp, "behind a tcp listener too")
        XCTAssertEqual(config.clusters[2].healthCheck?.transport, .udp)

        guard case .failure(let errors) = parse("""
            listeners:
              - { address: "127.0.0.1:53", protocol: udp, cluster: a }
              - { address: "127.0.0.1:54", protocol: udp, cluster: b }
              - { address: "127.0.0.1:55", cluster: c }
              - { address: "127.0.0.1:56", protocol: udp, cluster: d }
            clusters:
              - { name: d, endpoints: [{ address: "127.0.0.1:1" }], health_check: { type: send_expect, send: "", expect: "x" } }
              - { name: a, endpoints: [{ address: "127.0.0.1:1" }], health_check: { type: tcp } }
              - { name: b, endpoints: [{ address: "127.0.0.1:1" }], health_check: { type: dns, query: "a..b", query_type: BOGUS, expected_rcode: [WHAT] } }
              - { name: c, endpoints: [{ address: "127.0.0.1:1" }], health_check: { type: http, protocol: udp, query: x } }
            """) else { return XCTFail("accepted") }
        XCTAssertEqual(Set(errors.errors.map(\.description)), [
            "clusters[1].health_check.type: a udp health check must be send_expect or dns (the cluster is behind udp listeners)",
            "clusters[2].health_check.query: expected a domain name (labels of 1-63 characters, at most 253 in all), got \"a..b\"",
            "clusters[2].health_check.query_type: expected one of A, AAAA, ANY, CNAME, MX, NS, PTR, SOA, SRV, TXT or a number, got \"BOGUS\"",
            "clusters[2].health_check.expected_rcode[0]: expected one of FORMERR, NOERROR, NOTIMP, NXDOMAIN, REFUSED, SERVFAIL or 0-15, got \"WHAT\"",
            "clusters[3].health_check.query: applies to type dns only",
            "clusters[3].health_check.type: a udp health check must be send_expect or dns",
            "clusters[0].health_check.send: must not be empty for a udp health check",
        ])
    }
}
