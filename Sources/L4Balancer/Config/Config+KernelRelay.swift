/// `kernel_relay:` — the kernel forwarder (issue 35): where it runs and what it may use.
/// Listeners opt in with `relay: kernel`; a tcp one then has its flows forwarded by a tc
/// program with full NAT, the workers serving only what the kernel leaves to them.
extension Config {
    public struct KernelRelay: Sendable, Equatable {
        /// tcx ingress of these: where clients' packets and endpoints' replies arrive.
        public var interfaces: [String] = []
        /// Source ports for NAT toward endpoints; must not overlap the host's
        /// `ip_local_port_range` (checked at start) or a listener's port.
        public var natPorts: ClosedRange<Int> = 61000...65535
        /// Flows the table holds at once.
        public var flows = 262_144
        public static let flowRange = 1024...4_194_304

        public init() {}
    }

    /// Whether any tcp listener asks for the kernel forwarder.
    public var wantsKernelForwarding: Bool {
        listeners.contains { $0.transport == .tcp && $0.relay == .kernel }
    }
}
