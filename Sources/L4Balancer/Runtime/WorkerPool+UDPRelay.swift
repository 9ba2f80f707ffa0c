import BPFSteer
import Foundation

/// `relay: kernel` on the control plane's side: the kernel's UDP relay is loaded when a
/// listener first asks for it (at start or by a reload) and kept for the process's life;
/// the snapshot hands its flow table to the workers.
extension WorkerPool {
    /// Flows in the kernel's table: 131,072 sessions across workers (a session is two).
    /// `L4LB_UDP_RELAY_FLOWS` sets it (to see a full table without 131,072 clients).
    static var udpRelayCapacity: Int {
        ProcessInfo.processInfo.environment["L4LB_UDP_RELAY_FLOWS"].flatMap { Int($0) }.map { max($0, 2) } ?? 1 << 18
    }

    /// The relay `config` needs: `loaded` when there is one, a new one when a listener
    /// asks, nil when none does. A relay that cannot load names the listener that asked.
    static func loadUDPRelay(_ config: Config, loaded: UDPRelay?) throws(StartError) -> UDPRelay? {
        if let loaded { return loaded }
        guard let i = config.listeners.firstIndex(where: { $0.transport == .udp && $0.relay == .kernel && !$0.forwardedInKernel }) else { return nil }
        do {
            return try UDPRelay(capacity: udpRelayCapacity)
        } catch {
            throw StartError(description: "listeners[\(i)].relay: kernel: \(error)")
        }
    }
}
