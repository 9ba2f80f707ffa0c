import BPFSteer
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The kernel forwarder on the control plane's side (issue 35): at start it checks the
/// host (forwarding on, NAT ports clear of `ip_local_port_range`), loads the program and
/// attaches it to `kernel_relay.interfaces`; on every snapshot it writes the tcp listeners
/// with `relay: kernel` into the maps (endpoint slots, one plan per listener, services);
/// udp ones have their sessions' flows installed by the workers (`Worker+UDPRelay`);
/// every 50 ms it copies endpoint availability (health, ejection, drain) into the slots.
/// The workers keep listening on the same addresses: a SYN the kernel leaves to the stack
/// is accepted and proxied as before.
///
/// Driven under the pool's `controlLock` (start, reload, drain) and by its own sync
/// thread; `lock` keeps the two apart.
final class KernelForwarder: @unchecked Sendable {
    let relay: KernelRelay
    let settings: Config.KernelRelay
    private let lock = NSLock()
    /// Endpoint identity → kernel slot, for endpoints behind kernel listeners.
    private var slots: [Int: Int] = [:]
    private var freeSlots: [Int]
    /// Availability as last written, by slot.
    private var written: [Int: Bool] = [:]
    /// Services installed: address bytes and port.
    private var services: Set<[UInt8]> = []
    private var snapshot: Snapshot?
    private var stopped = false
    /// Set by a drain: no service is (re)installed after it, a reload included.
    private var draining = false

    /// What the sweeps found: entries left after the last, flows removed in all.
    private var tableEntries = 0
    private var expiredIdle = 0
    private var expiredClosed = 0
    private var expiredHalfOpen = 0
    private var activeByListener: [Int: Int] = [:]
    private var activeBySlot: [Int: Int] = [:]
    /// Slots whose flows were closed for `on_unhealthy: close` and that have not been
    /// healthy since; flows removed for it, by listener identity.
    private var closedSlots: Set<Int> = []
    private var closedUnhealthy: [Int: UInt64] = [:]
    /// Connects the sweeps found timed out (the endpoint never answered the SYN), by slot
    /// since it was given to its endpoint.
    private var connectTimeouts: [Int: UInt64] = [:]
    private var listenerConnectTimeouts: [Int: UInt64] = [:]
    /// How long a flow stays after a RST, or a FIN each way (its idle timeout if shorter).
    static let closedGraceNanoseconds: UInt64 = 10_000_000_000
    private let status: EndpointStatus

    struct StartError: Error, CustomStringConvertible { let description: String }

    /// Loads and attaches the forwarder `config` asks for; nil when no listener does.
    static func start(_ config: Config, status: EndpointStatus) throws(StartError) -> KernelForwarder? {
        guard config.wantsKernelForwarding else { return nil }
        let settings = config.kernelRelay
        let families = Set(config.listeners.filter { $0.forwardedInKernel }.map { $0.address.ip.count == 4 ? "ipv4" : "ipv6" })
        try checkHost(settings, families: families)
        let relay: KernelRelay
        do {
            relay = try KernelRelay(capacity: 2 * settings.flows)
            try relay.setNATPorts(first: UInt16(settings.natPorts.lowerBound), count: settings.natPorts.count)
            for interface in settings.interfaces { try relay.attach(to: interface) }
        } catch {
            throw StartError(description: "kernel_relay: \(error)")
        }
        return KernelForwarder(relay: relay, settings: settings, status: status)
    }

    private init(relay: KernelRelay, settings: Config.KernelRelay, status: EndpointStatus) {
        self.relay = relay
        self.settings = settings
        self.status = status
        freeSlots = Array((0..<KernelRelay.endpointSlotCapacity).reversed())
    }

    /// What the kernel's FIB helper and the stack's own sockets require of the host.
    static func checkHost(_ settings: Config.KernelRelay, families: Set<String>) throws(StartError) {
        for interface in settings.interfaces {
            guard if_nametoindex(interface) != 0 else {
                throw StartError(description: "kernel_relay.interfaces: no interface \(interface)")
            }
            for family in families.sorted() {
                let path = "/proc/sys/net/\(family)/conf/\(interface)/forwarding"
                guard let text = try? String(contentsOfFile: path, encoding: .utf8), text.trimmingCharacters(in: .whitespacesAndNewlines) == "1" else {
                    throw StartError(description: "kernel_relay.interfaces: \(interface) does not forward \(family == "ipv4" ? "IPv4" : "IPv6") "
                        + "(the kernel path forwards between interfaces as a router does); run sysctl -w net.\(family).conf.\(interface).forwarding=1")
                }
            }
        }
        // bpf_fib_lookup's source-address lookup (BPF_FIB_LOOKUP_SRC), which picks the NAT
        // address, came in 6.7; an older kernel would attach and then leave every SYN to the
        // proxy.
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let version = release.split(separator: ".").prefix(2).compactMap { Int($0.prefix { $0.isNumber }) }
        if version.count == 2, (version[0], version[1]) < (6, 7) {
            throw StartError(description: "kernel_relay: needs Linux 6.7 or later (bpf_fib_lookup with BPF_FIB_LOOKUP_SRC); this kernel is \(release)")
        }
        if let text = try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8) {
            let bounds = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).compactMap { Int($0) }
            if bounds.count == 2, bounds[0] <= settings.natPorts.upperBound, settings.natPorts.lowerBound <= bounds[1] {
                throw StartError(description: "kernel_relay.nat_ports: \(settings.natPorts.lowerBound)-\(settings.natPorts.upperBound) overlaps "
                    + "net.ipv4.ip_local_port_range \(bounds[0])-\(bounds[1]); choose ports outside it (e.g. 61000-65535) or narrow the range")
            }
        }
    }

    /// Writes `snapshot`'s kernel listeners into the maps: slots for endpoints new to them,
    /// a plan per listener (each swapped whole), services added and removed. Flows already
    /// installed keep their endpoint whatever changes. `paused` listeners' SYNs go to the
    /// stack (a blocklist or rate limit enforced in user space must see them).
    func apply(_ snapshot: Snapshot, paused: (Snapshot.ListenerPlan) -> Bool) throws {
        lock.lock()
        defer { lock.unlock() }
        let kernelListeners = snapshot.listeners.filter(Self.picksInKernel)
        var wanted: [Int] = []
        for listener in kernelListeners {
            for endpoint in endpoints(of: listener, in: snapshot) { wanted.append(endpoint.id) }
        }
        let wantedSet = Set(wanted)
        // Slots of endpoints no kernel listener reaches any more are freed (installed flows
        // hold the endpoint's address, not its slot), but only once every plan is written:
        // until its listener's plan is swapped, an old plan may still name the slot.
        var freed: [Int] = []
        for (id, slot) in slots where !wantedSet.contains(id) {
            slots[id] = nil
            written[slot] = nil
            freed.append(slot)
        }
        defer { freeSlots += freed }
        for listener in kernelListeners {
            for endpoint in endpoints(of: listener, in: snapshot) where slots[endpoint.id] == nil {
                guard let slot = freeSlots.popLast() else {
                    throw StartError(description: "kernel_relay: more than \(KernelRelay.endpointSlotCapacity) endpoints behind kernel listeners")
                }
                slots[endpoint.id] = slot
                connectTimeouts[slot] = nil
                try relay.resetTraffic(slot: slot)
                let available = status.flags(endpoint.id).rawValue == 0
                try relay.setEndpoint(slot: slot, KernelRelay.Endpoint(address: endpoint.address.ip, port: endpoint.address.port,
                                                                       available: available, identity: UInt32(endpoint.id)))
                written[slot] = available
            }
            guard let cluster = listener.clusters.first.map({ snapshot.clusters[$0] }) else { continue }
            let members = Array(snapshot.endpoints[cluster.firstEndpoint..<(cluster.firstEndpoint + cluster.endpointCount)])
            let memberSlots = members.map { UInt32(slots[$0.id]!) }
            let words: [UInt32]
            switch cluster.balancer {
            case .maglev:
                guard let table = cluster.maglevTable else { continue }
                words = KernelRelayPlan.maglev(table: table.slots, slots: memberSlots, weights: cluster.weights, hashKey: Self.hashKey(cluster.hashKey),
                                               cluster: UInt32(cluster.id), generation: UInt32(truncatingIfNeeded: snapshot.generation))
            default:
                words = KernelRelayPlan.random(keep: cluster.aliasTable.keep, alias: cluster.aliasTable.alias, slots: memberSlots, weights: cluster.weights,
                                               cluster: UInt32(cluster.id), generation: UInt32(truncatingIfNeeded: snapshot.generation))
            }
            try relay.setPlan(listener: listener.id, words: words)
        }
        self.snapshot = snapshot
        try writeServices(kernelListeners, paused: paused)
    }

    /// Installs a service per kernel listener (none while draining) and removes the rest;
    /// `services` follows each write, so a rollback after a failure knows what is in.
    private func writeServices(_ kernelListeners: [Snapshot.ListenerPlan], paused: (Snapshot.ListenerPlan) -> Bool) throws {
        var wanted: Set<[UInt8]> = []
        for listener in kernelListeners where !draining {
            try relay.setService(address: listener.address.ip, port: listener.address.port, listener: listener.id, paused: paused(listener))
            let key = Self.serviceKey(listener.address)
            services.insert(key)
            wanted.insert(key)
        }
        for key in services.subtracting(wanted) {
            try relay.removeService(address: Array(key.dropLast(2)), port: UInt16(key[key.count - 2]) << 8 | UInt16(key[key.count - 1]))
            services.remove(key)
        }
    }

    /// Re-writes the services' paused flags (a blocklist entry added or removed at run time
    /// can move the blocklist between XDP and the workers).
    func refreshPaused(_ paused: (Snapshot.ListenerPlan) -> Bool) {
        lock.lock()
        defer { lock.unlock() }
        guard let snapshot else { return }
        try? writeServices(snapshot.listeners.filter(Self.picksInKernel), paused: paused)
    }

    /// No new kernel flows from now on (a drain): every service is removed; installed
    /// flows go on.
    func stopNewFlows() {
        lock.lock()
        defer { lock.unlock() }
        draining = true
        for key in services {
            try? relay.removeService(address: Array(key.dropLast(2)), port: UInt16(key[key.count - 2]) << 8 | UInt16(key[key.count - 1]))
        }
        services = []
    }

    /// Starts the thread that copies endpoint availability into the slots within 2 ms of a
    /// change (and in full every second), and expires flows every quarter of the shortest
    /// kernel listener's idle timeout (250 ms to 5 s).
    func startSync() {
        let thread = Thread { [self] in
            var nextSweep: UInt64 = 0
            var nextFullSync: UInt64 = 0
            var seenEpoch = UInt64.max
            while lock.withLock({ !stopped }) {
                let now = KernelRelay.monotonicNanoseconds()
                let epoch = status.availabilityEpoch.load(ordering: .acquiring)
                if epoch != seenEpoch || now >= nextFullSync {
                    seenEpoch = epoch
                    nextFullSync = now + 1_000_000_000
                    syncAvailability()
                }
                if now >= nextSweep {
                    nextSweep = now + sweep(now: now)
                }
                usleep(2_000)
            }
        }
        thread.name = "l4lb-kernel-sync"
        thread.start()
    }

    func stop() { lock.withLock { stopped = true } }

    /// What the sweeps found: TCP entries left after the last, flows removed in all.
    var expiry: (tableEntries: Int, idle: Int, closed: Int, halfOpen: Int) {
        lock.withLock { (tableEntries, expiredIdle, expiredClosed, expiredHalfOpen) }
    }

    /// What the kernel counted for listener `id`'s flows, and how many it held at the last
    /// sweep.
    func traffic(listener id: Int) -> (counts: KernelRelay.Traffic, active: Int) {
        var counts = relay.traffic(listener: id)
        return lock.withLock {
            counts.connectFailures &+= listenerConnectTimeouts[id] ?? 0
            return (counts, activeByListener[id] ?? 0)
        }
    }

    /// The same for endpoint `id`, while it is behind a kernel listener; nil otherwise.
    func traffic(endpoint id: Int) -> (counts: KernelRelay.Traffic, active: Int)? {
        guard let slot = lock.withLock({ slots[id] }) else { return nil }
        var counts = relay.traffic(slot: slot)
        return lock.withLock {
            counts.connectFailures &+= connectTimeouts[slot] ?? 0
            return (counts, activeBySlot[slot] ?? 0)
        }
    }

    /// The kernel's connects to endpoint `id` (behind a kernel listener): its SYN-ACKs, and
    /// its RSTs, ICMP errors and silences answering the kernel's SYNs. Outlier detection
    /// adds them to the workers' connects.
    func connects(endpoint id: Int) -> (successes: UInt64, failures: UInt64)? {
        guard let counts = traffic(endpoint: id)?.counts else { return nil }
        return (counts.connectSuccesses, counts.connectFailures)
    }

    /// Endpoint slots the kernel currently skips for new flows (unhealthy, ejected,
    /// draining), as last written.
    var unavailableEndpoints: Int { lock.withLock { written.values.filter { !$0 }.count } }

    /// One pass of expiry; returns the nanoseconds until the next. The table is walked
    /// outside `lock`: availability, `/stats` and reloads do not wait for it.
    func sweep(now: UInt64) -> UInt64 {
        guard let snapshot = lock.withLock({ self.snapshot }) else { return 1_000_000_000 }
        var idle: [Int: UInt64] = [:], connect: [Int: UInt64] = [:]
        for listener in snapshot.listeners where Self.picksInKernel(listener) {
            idle[listener.id] = UInt64(max(listener.idleTimeoutMilliseconds, 1)) * 1_000_000
            connect[listener.id] = UInt64(max(listener.connectTimeoutMilliseconds, 1)) * 1_000_000
        }
        // A listener a reload removed: its flows expire by the longest timeouts left.
        let longest = idle.values.max() ?? UInt64(Config.Listener.defaultIdleTimeoutMilliseconds) * 1_000_000
        let longestConnect = connect.values.max() ?? longest
        let cpuBefore = Self.threadCPUNanoseconds()
        let result = relay.sweep(now: now, closedNanoseconds: Self.closedGraceNanoseconds) { (idle[$0] ?? longest, connect[$0] ?? longestConnect) }
        lock.withLock {
            tableEntries = result.entries
            expiredIdle += result.expiredIdle
            expiredClosed += result.expiredClosed
            expiredHalfOpen += result.expiredHalfOpen
            activeByListener = result.activeByListener
            activeBySlot = result.activeBySlot
            for (slot, count) in result.connectTimeoutsBySlot { connectTimeouts[slot, default: 0] += UInt64(count) }
            for (listener, count) in result.connectTimeoutsByListener { listenerConnectTimeouts[listener, default: 0] += UInt64(count) }
        }
        let shortest = min(idle.values.min() ?? longest, connect.values.min() ?? longest)
        // A pass over a large table costs CPU (about 0.2 s at 100,000 flows): the next one
        // waits at least 20 times the CPU time it took, so the sweeper never takes more
        // than 5 % of a core, and expiry is that much later than the timeout at worst.
        let took = Self.threadCPUNanoseconds() &- cpuBefore
        return max(min(max(shortest / 4, 250_000_000), 5_000_000_000), 20 * took)
    }

    /// CPU time the calling thread has used, in nanoseconds.
    static func threadCPUNanoseconds() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }

    /// Writes the slots whose endpoint's availability changed since the last write; then,
    /// for an endpoint of an `on_unhealthy: close` cluster that has just turned unhealthy or
    /// been ejected, removes its kernel flows (after its slot is out of the choice, so no new
    /// flow can take it meanwhile).
    func syncAvailability() {
        var closing: Set<Int> = []
        lock.withLock {
            guard let snapshot else { return }
            for endpoint in snapshot.endpoints {
                guard let slot = slots[endpoint.id] else { continue }
                let flags = status.flags(endpoint.id)
                let available = flags.rawValue == 0
                if written[slot] != available,
                   (try? relay.setEndpoint(slot: slot, KernelRelay.Endpoint(address: endpoint.address.ip, port: endpoint.address.port,
                                                                            available: available, identity: UInt32(endpoint.id)))) != nil {
                    written[slot] = available
                }
                let failed = !flags.isDisjoint(with: [.unhealthy, .ejected]) && written[slot] == false
                if failed, snapshot.clusters[endpoint.cluster].config.onUnhealthy == .close {
                    if closedSlots.insert(slot).inserted { closing.insert(slot) }
                } else if !failed {
                    closedSlots.remove(slot)
                }
            }
        }
        guard !closing.isEmpty else { return }
        let closed = relay.closeFlows(toSlots: closing)
        lock.withLock {
            for (listener, count) in closed { closedUnhealthy[listener, default: 0] += UInt64(count) }
        }
    }

    /// Kernel flows removed because their endpoint turned unhealthy under
    /// `on_unhealthy: close`, by listener identity.
    func closedUnhealthy(listener id: Int) -> UInt64 { lock.withLock { closedUnhealthy[id] ?? 0 } }

    private func endpoints(of listener: Snapshot.ListenerPlan, in snapshot: Snapshot) -> ArraySlice<Snapshot.EndpointPlan> {
        guard let c = listener.clusters.first else { return [] }
        let cluster = snapshot.clusters[c]
        return snapshot.endpoints[cluster.firstEndpoint..<(cluster.firstEndpoint + cluster.endpointCount)]
    }

    /// TCP listeners the kernel forwards: a SYN picks its endpoint in the kernel. (A UDP
    /// session's first datagram reaches a worker, which picks and installs the flow.)
    private static func picksInKernel(_ listener: Snapshot.ListenerPlan) -> Bool {
        listener.forwardedInKernel && listener.transport == .tcp
    }

    private static func serviceKey(_ address: SocketAddress) -> [UInt8] {
        address.ip + [UInt8(address.port >> 8), UInt8(address.port & 0xFF)]
    }

    private static func hashKey(_ key: Config.Cluster.HashKey) -> KernelRelayPlan.HashKey {
        switch key {
        case .sourceIP: .sourceIP
        case .sourceIPPort: .sourceIPPort
        case .fiveTuple: .fiveTuple
        }
    }
}

extension WorkerPool {
    /// Whether a kernel listener's SYNs must reach the workers instead: a blocklist the
    /// workers enforce (XDP is not attached), or rate limits the kernel does not cover.
    static func kernelPaused(_ filter: PacketFilter) -> (Snapshot.ListenerPlan) -> Bool {
        let userspaceList = filter.store.filter.enforcing
        return { listener in userspaceList || (listener.rateLimit != nil && !listener.rateLimitInKernel) }
    }
}
