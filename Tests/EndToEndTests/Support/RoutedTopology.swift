import CTestSupport
import Foundation

/// Three network namespaces for the kernel forwarding tests (issue 35): clients, l4lb's,
/// endpoints, each pair joined by a veth, with documentation addresses.
///
///     client  l4c 198.51.100.2/24 2001:db8:1::2/64   (default routes via l4lb)
///        |
///     l4lb    l4b-c 198.51.100.1/24 2001:db8:1::1/64
///             l4b-e 203.0.113.1/24  2001:db8:2::1/64  (forwarding on both)
///        |
///     endpoint l4e 203.0.113.2/24 2001:db8:2::2/64    (no route beyond its own link)
///
/// The endpoints have no route to the clients: with full NAT they only ever talk to
/// l4lb's address on their own link, so a packet that escaped the NAT would go nowhere.
final class RoutedTopology: @unchecked Sendable {
    let client: NetworkNamespace
    let balancer: NetworkNamespace
    let endpoint: NetworkNamespace

    enum Address {
        static let client4 = "198.51.100.2", client6 = "2001:db8:1::2"
        static let listener4 = "198.51.100.1", listener6 = "2001:db8:1::1"
        static let nat4 = "203.0.113.1", nat6 = "2001:db8:2::1"
        static let endpoint4 = "203.0.113.2", endpoint6 = "2001:db8:2::2"
    }

    init(_ tag: String) throws {
        client = try NetworkNamespace("\(tag)-c")
        balancer = try NetworkNamespace("\(tag)-l")
        endpoint = try NetworkNamespace("\(tag)-e")
        try client.ip(["link", "add", "l4c", "type", "veth", "peer", "name", "l4b-c", "netns", balancer.name])
        try endpoint.ip(["link", "add", "l4e", "type", "veth", "peer", "name", "l4b-e", "netns", balancer.name])
        try client.ip(["addr", "add", "\(Address.client4)/24", "dev", "l4c"])
        try client.ip(["addr", "add", "\(Address.client6)/64", "dev", "l4c", "nodad"])
        try balancer.ip(["addr", "add", "\(Address.listener4)/24", "dev", "l4b-c"])
        try balancer.ip(["addr", "add", "\(Address.listener6)/64", "dev", "l4b-c", "nodad"])
        try balancer.ip(["addr", "add", "\(Address.nat4)/24", "dev", "l4b-e"])
        try balancer.ip(["addr", "add", "\(Address.nat6)/64", "dev", "l4b-e", "nodad"])
        try endpoint.ip(["addr", "add", "\(Address.endpoint4)/24", "dev", "l4e"])
        try endpoint.ip(["addr", "add", "\(Address.endpoint6)/64", "dev", "l4e", "nodad"])
        for (namespace, interface) in [(client, "l4c"), (balancer, "l4b-c"), (balancer, "l4b-e"), (endpoint, "l4e")] {
            try namespace.ip(["link", "set", interface, "up"])
        }
        try client.ip(["route", "add", "default", "via", Address.listener4])
        try client.ip(["-6", "route", "add", "default", "via", Address.listener6])
        for key in ["net.ipv4.conf.l4b-c.forwarding", "net.ipv4.conf.l4b-e.forwarding",
                    "net.ipv6.conf.l4b-c.forwarding", "net.ipv6.conf.l4b-e.forwarding"] {
            try balancer.sysctl(key, "1")
        }
    }

    /// Turns transmit checksum offload off on the client's and the endpoint's interfaces:
    /// their packets then carry full checksums (CHECKSUM_NONE) that the far side verifies,
    /// instead of CHECKSUM_PARTIAL ones a veth peer trusts.
    func sendFullChecksums() throws {
        for (namespace, interface) in [(client, "l4c"), (endpoint, "l4e")] {
            let rc = try namespace.run { CTest_set_tx_checksum(interface, 0) }
            guard rc == 0 else { throw Sockets.Failure("tx checksum off on \(interface)", -rc) }
        }
    }

    /// Segments and datagrams that arrived with a bad checksum in `namespace` since it was
    /// made, by counter (`Tcp.InCsumErrors`, `Udp.InCsumErrors`, `Udp6InCsumErrors`); only
    /// the non-zero ones.
    func checksumErrors(in namespace: NetworkNamespace) throws -> [String: Int] {
        let result = try ChildProcess.run("/usr/sbin/ip", ["netns", "exec", namespace.name, "cat", "/proc/net/snmp", "/proc/net/snmp6"])
        guard result.status == 0 else { throw Sockets.Failure("reading /proc/net/snmp: \(result.output)", 0) }
        var errors: [String: Int] = [:]
        let lines = result.output.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        for (index, line) in lines.enumerated() {
            if line.count == 2, line[0].hasSuffix("InCsumErrors"), let value = Int(line[1]), value > 0 { errors[line[0]] = value }
            // /proc/net/snmp: a line of names, then one of values, both led by "Tcp:" etc.
            guard index + 1 < lines.count, let group = line.first, group.hasSuffix(":"), lines[index + 1].first == group,
                  Int(line.last ?? "") == nil else { continue }
            for (name, value) in zip(line.dropFirst(), lines[index + 1].dropFirst()) where name == "InCsumErrors" {
                if let count = Int(value), count > 0 { errors["\(group)\(name)"] = count }
            }
        }
        return errors
    }
}

extension NetworkNamespace {
    /// `sysctl -w KEY=VALUE` inside the namespace.
    func sysctl(_ key: String, _ value: String) throws {
        let result = try ChildProcess.run("/usr/sbin/ip", ["netns", "exec", name, "sysctl", "-qw", "\(key)=\(value)"])
        guard result.status == 0 else { throw Sockets.Failure("sysctl \(key)=\(value): \(result.output)", 0) }
    }
}
