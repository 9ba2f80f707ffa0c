import BPFSteer

/// The listeners' rate limits the XDP program enforces (`KernelRateLimits` decides which).
extension PacketFilter {
    /// The attached interfaces' names, or none when the lists are enforced in user space.
    var attachedInterfaceNames: Set<String> {
        lock.withLock { userspace ? [] : Set(attached.map(\.name)) }
    }

    /// Gives the program the rules of `snapshot` (before the workers take it).
    func installRateLimits(_ snapshot: Snapshot) throws(BPFError) {
        lock.lock()
        defer { lock.unlock() }
        try xdp?.setRateRules(KernelRateLimits.rules(snapshot))
    }

    /// What XDP dropped for listener `id`, and let through exempt.
    func kernelRateCounters(listener id: Int) -> (newConnections: UInt64, packets: UInt64, exempt: UInt64) {
        lock.withLock { xdp?.rateCounters(id: UInt32(id)) ?? (0, 0, 0) }
    }

    /// The program's LRU maps, when it is loaded and attached.
    func kernelRateTable() -> XDPFilter.RateTableCounts? {
        lock.withLock { userspace ? nil : xdp?.rateTableCounts() }
    }
}
