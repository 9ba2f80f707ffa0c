/// `kernel_relay:` — the kernel forwarder (issue 35): where it runs and what it may use.
/// Listeners opt in with `relay: kernel`; a tcp one, or a udp one on an address other than
/// loopback, then has its flows forwarded by a tc program with full NAT, the workers
/// serving only what the kernel leaves to them. (A udp listener on loopback keeps the
/// `lo` relay, which the workers hand sessions to.)
extension Config {
    public struct KernelRelay: Sendable, Equatable {
        /// tcx ingress of these: where clients' packets and endpoints' replies arrive.
        public var interfaces: [String] = []
        /// Source ports for NAT toward endpoints; must not overlap the host's
        /// `ip_local_port_range` (checked at start) or a listener's port.
        public var natPorts: ClosedRange<Int> = 61000...65535
        /// Flows the table holds at once.
        public var flows = 262_144
        public static let flowRange = 16...4_194_304

        public init() {}
    }

    /// Whether any listener asks for the kernel forwarder.
    public var wantsKernelForwarding: Bool {
        listeners.contains { $0.forwardedInKernel }
    }
}

extension Config.Listener {
    /// Whether the kernel forwarder carries this listener's flows: `relay: kernel` on tcp,
    /// or on udp away from loopback (where the `lo` relay serves instead).
    public var forwardedInKernel: Bool {
        Config.Listener.forwardedInKernel(relay: relay, transport: transport, address: address)
    }

    static func forwardedInKernel(relay: Relay, transport: TransportProtocol, address: SocketAddress) -> Bool {
        relay == .kernel && (transport == .tcp || !address.isLoopback)
    }
}

extension Snapshot.ListenerPlan {
    /// See `Config.Listener.forwardedInKernel`.
    var forwardedInKernel: Bool {
        Config.Listener.forwardedInKernel(relay: relay, transport: transport, address: address)
    }
}
