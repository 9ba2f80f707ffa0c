import Foundation

/// Four network namespaces for the path-MTU tests (issue 35, must-show 6): the clients and
/// l4lb as in `RoutedTopology`, but the endpoints behind a router whose route toward them
/// carries at most `mtu` bytes, though every interface is 1,500. The endpoints advertise
/// a 1,460-byte MSS, so a client's full-sized segments reach the router, which answers with
/// ICMP "fragmentation needed" (IPv6: "packet too big") to l4lb's NAT address.
///
///     client  l4c 198.51.100.2/24 2001:db8:1::2/64     (default routes via l4lb)
///     l4lb    l4b-c 198.51.100.1/24 2001:db8:1::1/64
///             l4b-r 192.0.2.1/24 2001:db8:3::1/64      (routes to the endpoints via the router)
///     router  r-l 192.0.2.2/24 2001:db8:3::2/64
///             r-e 203.0.113.1/24 2001:db8:2::1/64       (route toward the endpoints: `mtu`)
///     endpoint l4e 203.0.113.2/24 2001:db8:2::2/64      (default routes via the router)
final class BottleneckTopology: @unchecked Sendable {
    let client: NetworkNamespace
    let balancer: NetworkNamespace
    let router: NetworkNamespace
    let endpoint: NetworkNamespace

    enum Address {
        static let listener4 = RoutedTopology.Address.listener4, listener6 = RoutedTopology.Address.listener6
        static let nat4 = "192.0.2.1", nat6 = "2001:db8:3::1"
        static let endpoint4 = "203.0.113.2", endpoint6 = "2001:db8:2::2"
    }

    init(_ tag: String, mtu: Int) throws {
        client = try NetworkNamespace("\(tag)-c")
        balancer = try NetworkNamespace("\(tag)-l")
        router = try NetworkNamespace("\(tag)-r")
        endpoint = try NetworkNamespace("\(tag)-e")
        try client.ip(["link", "add", "l4c", "type", "veth", "peer", "name", "l4b-c", "netns", balancer.name])
        try balancer.ip(["link", "add", "l4b-r", "type", "veth", "peer", "name", "r-l", "netns", router.name])
        try endpoint.ip(["link", "add", "l4e", "type", "veth", "peer", "name", "r-e", "netns", router.name])
        let addresses: [(NetworkNamespace, String, [String])] = [
            (client, "l4c", ["198.51.100.2/24", "2001:db8:1::2/64"]),
            (balancer, "l4b-c", ["198.51.100.1/24", "2001:db8:1::1/64"]),
            (balancer, "l4b-r", ["192.0.2.1/24", "2001:db8:3::1/64"]),
            (router, "r-l", ["192.0.2.2/24", "2001:db8:3::2/64"]),
            (router, "r-e", ["203.0.113.1/24", "2001:db8:2::1/64"]),
            (endpoint, "l4e", ["203.0.113.2/24", "2001:db8:2::2/64"]),
        ]
        for (namespace, interface, list) in addresses {
            for address in list {
                try namespace.ip(["addr", "add", address, "dev", interface] + (address.contains(":") ? ["nodad"] : []))
            }
            try namespace.ip(["link", "set", interface, "up"])
        }
        try client.ip(["route", "add", "default", "via", "198.51.100.1"])
        try client.ip(["-6", "route", "add", "default", "via", "2001:db8:1::1"])
        try balancer.ip(["route", "add", "203.0.113.0/24", "via", "192.0.2.2"])
        try balancer.ip(["-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:3::2"])
        try endpoint.ip(["route", "add", "default", "via", "203.0.113.1"])
        try endpoint.ip(["-6", "route", "add", "default", "via", "2001:db8:2::1"])
        try router.ip(["route", "replace", "203.0.113.0/24", "dev", "r-e", "src", "203.0.113.1", "mtu", "lock", "\(mtu)"])
        try router.ip(["-6", "route", "replace", "2001:db8:2::/64", "dev", "r-e", "mtu", "lock", "\(mtu)"])
        for key in ["net.ipv4.conf.l4b-c.forwarding", "net.ipv4.conf.l4b-r.forwarding",
                    "net.ipv6.conf.l4b-c.forwarding", "net.ipv6.conf.l4b-r.forwarding"] {
            try balancer.sysctl(key, "1")
        }
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] { try router.sysctl(key, "1") }
    }
}
