import BPFSteer
import Logging

/// Run-time blocklist changes (`l4lb block add|remove`, `POST/DELETE /blocklist`): written
/// to the XDP maps at once, and handed to the workers' user-space check with a wake-up.
extension WorkerPool {
    public func block(_ text: String) -> Result<FilterEntry, PacketFilter.EntryError> {
        let result = filter.add(text)
        if case .success(let entry) = result {
            for control in controls { control.wake() }
            kernelForwarder?.refreshPaused(WorkerPool.kernelPaused(filter))
            logger.info("blocklist entry added", metadata: ["entry": "\(entry)"])
        }
        return result
    }

    public func unblock(_ text: String) -> Result<FilterEntry, PacketFilter.EntryError> {
        let result = filter.remove(text)
        if case .success(let entry) = result {
            for control in controls { control.wake() }
            kernelForwarder?.refreshPaused(WorkerPool.kernelPaused(filter))
            logger.info("blocklist entry removed", metadata: ["entry": "\(entry)"])
        }
        return result
    }

    /// Packets (XDP) or connections (user space) by reason, per place the filter runs.
    public func filterCounts() -> [(interface: String, mode: String, counts: [FilterReason: UInt64])] {
        var rows = filter.kernelCounters().map { (interface: $0.0.name, mode: $0.0.mode.rawValue, counts: $0.1) }
        if filter.userspace {
            var counts: [FilterReason: UInt64] = [:]
            for reason in FilterReason.allCases {
                counts[reason] = controls.reduce(0) { $0 &+ $1.stats.value(.filterCounter(reason)) }
            }
            rows.append((interface: "*", mode: PacketFilter.Mode.userspace.rawValue, counts: counts))
        }
        return rows
    }
}
