import CLinux
import Logging
import URing

#if canImport(Glibc)
import Glibc
#endif

/// One data-plane worker: a thread with its own ring, listener sockets, connection slab,
/// buffer ring, balancers and counters. It shares nothing mutable with other workers
/// except `ListenerLimits` (the listeners' connection counts and the per-source rate-limit
/// table), and publishes its counters through `WorkerStats` for the control side to read.
final class Worker {
    static let tickMilliseconds: Int64 = 100
    static let smallBufferGroup: UInt16 = 1
    static let largeBufferGroup: UInt16 = 2
    static let completionBatch: UInt32 = 256
    /// Under load, completions may gather for up to this long before the worker is woken
    /// (batched waits): the peers that send the packets then stop paying a cross-CPU
    /// wake-up for most of them (function-call IPIs on the worker's CPU: 0.2–0.5 per
    /// request without, ~0.02 with). `L4LB_BATCH_US` sets it; 0 wakes for every completion.
    static let defaultBatchWindowMicroseconds: UInt32 = 20
    /// The load that turns the window on: a wake-up that found at least this many
    /// completions. A lone request (ping-pong) stays below it and is never delayed.
    /// `L4LB_BATCH_MIN` sets it, for measuring.
    static let defaultBatchThreshold = 8

    let ring: Ring
    let control: WorkerControl
    let stats: WorkerStats
    let logger: Logger
    /// What the worker shares with the control side (snapshot, filter, limits, health).
    let shared: WorkerShared
    /// The blocklist as enforced in user space (`enforcing` is false while XDP does it).
    var sourceFilter: SourceFilter
    var random: FastRandom
    /// The event loop's own state and the clock it keeps.
    var loop: LoopState
    var clock: WorkerClock
    var drain = DrainPhase.serving
    /// The listening sockets, by listener identity.
    var listeners: ListenerTable
    /// The plans connections run under: the current one and every one still in use.
    var plans: PlanTable
    /// Connection records, and beside them what only some connections need.
    var slab: ConnectionSlab
    let side: SlotSideTables
    var wheel: TimerWheel
    var buffers: ReceiveBuffers
    /// The UDP side: datagram buffers, sessions, kernel-relayed sessions.
    var datagrams: DatagramPlane
    /// This worker's connections per endpoint and cluster (least request, bounded load).
    let active: WorkerActiveCounts
    /// The access log's hand-off ring; nil when it is off (then the data path does nothing
    /// for it but test this for nil).
    let accessLog: AccessLogRing?
    /// When a resource error was last logged (monotonic ms; 0 = never).
    var lastResourceWarning: Int64 = 0

    static let maximumAttempts = 16
    /// Balancer picks per endpoint choice (slow start and full endpoints skip some).
    static let picksPerChoice = 8
    /// Side-table entries per slot: one per attempt, then this choice's skips.
    static let triedStride = maximumAttempts + picksPerChoice

    /// Notes `local` as excluded: a bit below 64, else the next entry of the slot's side
    /// table (`others`, holding `count` entries).
    @inline(__always)
    static func exclude(_ local: Int, bits: inout UInt64, others: UnsafeMutablePointer<UInt16>, count: inout Int) {
        if local < 64 {
            bits |= 1 &<< UInt64(local)
        } else {
            others[count] = UInt16(local)
            count += 1
        }
    }

    /// Whether the worker has stopped taking new connections.
    var draining: Bool { drain != .serving }

    // Computed, not stored: the optimizer folds these to constants, where a stored static
    // would be a lazily initialised global (a `swift_once` call per event).
    @inline(__always) static var toUpstreamOffset: Int { MemoryLayout<Connection>.offset(of: \Connection.toUpstream)! }
    @inline(__always) static var toClientOffset: Int { MemoryLayout<Connection>.offset(of: \Connection.toClient)! }

    struct Options {
        var ringEntries: UInt32 = 4096
        /// Sizes and counts come from the config (`Config.Buffers` has the defaults).
        var buffers: Config.Buffers
        /// Small buffers in the kernel's ring at once; the rest wait in the pool's free stack.
        var smallBufferWindow = 1024

        init(buffers: Config.Buffers = Config.Buffers()) {
            self.buffers = buffers
        }

        /// The largest power of two ≤ `count`, capped: what one ring can hold.
        static func window(for count: Int, cap: Int) -> Int {
            var window = 1
            while window * 2 <= min(count, cap) { window *= 2 }
            return window
        }
    }

    /// Slots per worker: enough for every listener's share, at least `minimumCapacity` so
    /// listeners added by a reload have room. Reserved, not touched: unused slots cost no
    /// resident memory.
    static let minimumCapacity = 1 << 20

    init(store: SnapshotStore, filters: FilterStore, control: WorkerControl, limits: ListenerLimits, status: EndpointStatus, options: Options, logger: Logger) throws {
        shared = WorkerShared(store: store, filters: filters, limits: limits, status: status)
        sourceFilter = filters.filter
        self.control = control
        self.stats = control.stats
        random = FastRandom(seed: UInt64(control.index) &+ 0x5EED)
        self.logger = logger
        let snapshot = store.snapshot
        plans = PlanTable(snapshot: snapshot, worker: control.index)
        listeners = ListenerTable(capacity: IdentityRegistry.listenerCapacity)
        ring = try Ring(entries: options.ringEntries)
        let shares = snapshot.listeners.reduce(0) { $0 + ($1.maxConnections ?? Config.Listener.defaultCapacity) }
        let capacity = min(max(shares, Worker.minimumCapacity), 1 << 22)
        buffers = try ReceiveBuffers(ring: ring, options: options, slots: capacity)
        datagrams = try DatagramPlane(ring: ring)
        slab = ConnectionSlab(capacity: capacity)
        side = SlotSideTables(capacity: capacity, accessLog: control.accessLog != nil)
        accessLog = control.accessLog
        clock = WorkerClock(now: monotonicMilliseconds())
        wheel = TimerWheel(now: 0)
        active = WorkerActiveCounts()
        // L4LB_BATCH_US sets the window (0: wake for every completion), L4LB_BATCH_MIN the
        // load that turns it on; the kernel must support batched waits (6.12).
        let window = getenv("L4LB_BATCH_US").flatMap { UInt32(String(cString: $0)) } ?? Worker.defaultBatchWindowMicroseconds
        loop = LoopState(
            batch: Worker.completionBatch, tickMilliseconds: Worker.tickMilliseconds,
            batchWindowMicroseconds: ring.capabilities.batchWait ? window : 0,
            batchThreshold: getenv("L4LB_BATCH_MIN").flatMap { Int(String(cString: $0)) } ?? Worker.defaultBatchThreshold)
    }

    deinit {
        // Explicitly, while the ring is alive: stored properties are destroyed after this
        // body, in an order the language does not promise.
        buffers.deallocate(ring: ring)
        datagrams.deallocate(ring: ring)
        slab.deallocate()
        wheel.deallocate()
        side.deallocate()
        active.deallocate()
        loop.deallocate()
    }


    /// Milliseconds as timer ticks, rounded up (0 stays 0: no timeout).
    static func ticks(_ milliseconds: Int64) -> UInt32 {
        milliseconds <= 0 ? 0 : UInt32(min(max(1, (milliseconds + tickMilliseconds - 1) / tickMilliseconds), Int64(UInt32.max / 2)))
    }

    // MARK: Loop

    /// Runs until a drain has closed every connection.
    func run() {
        serve(plans.current.snapshot)
        publishPlans()
        armWake()
        armTick()
        logger.debug("worker started", metadata: [
            "worker": "\(control.index)", "io_uring": "\(ring.capabilities)",
            "connection_record_bytes": "\(MemoryLayout<Connection>.stride)",
        ])

        var loggedWaitError = false
        while !(draining && slab.active == 0) {
            do {
                try waitForCompletions()
            } catch {
                // Degrade, never stop serving: count it, log the first one, back off a
                // moment, and reap whatever is there.
                stats.add(.waitErrors)
                if !loggedWaitError {
                    loggedWaitError = true
                    logger.error("io_uring wait failed: \(error); retrying", metadata: ["worker": "\(control.index)"])
                }
                usleep(1000)
            }
            stats.add(.iterations)
            updateClock()
            var handled = 0
            while true {
                let count = ring.reap(into: loop.completions)
                for i in 0..<count { handle(loop.completions[i]) }
                handled += count
                if count < loop.completions.count { break }
            }
            loop.lastBatch = handled
            returnBuffers()
            // The worker's own requests, if the submission queue refused them.
            if !loop.tickArmed { armTick() }
            if !loop.wakeArmed { armWake() }
        }
        endAllSessions()
        _ = ring.submitPending()
        closeEndedUpstreams()
        for id in listeners.served where listeners[id].fd >= 0 { Glibc.close(listeners[id].fd) }
        for fd in listeners.retiring { Glibc.close(fd) }
        logger.debug("worker stopped", metadata: ["worker": "\(control.index)"])
    }

    @inline(never)
    func waitForCompletions() throws(Errno) {
        if loop.batchWindowMicroseconds > 0, loop.lastBatch >= loop.batchThreshold {
            try ring.submitAndWait(batch: Worker.completionBatch, windowMicroseconds: loop.batchWindowMicroseconds, timeoutMilliseconds: 1000)
        } else {
            try ring.submitAndWait(minimum: 1)
        }
        closeEndedUpstreams()
    }

    /// Every queued request naming them has been submitted (and holds its own reference).
    @inline(__always)
    func closeEndedUpstreams() {
        guard !datagrams.upstreamsToClose.isEmpty else { return }
        for fd in datagrams.upstreamsToClose { Glibc.close(fd) }
        datagrams.upstreamsToClose.removeAll(keepingCapacity: true)
    }

    @inline(__always)
    func updateClock() {
        clock.milliseconds = monotonicMilliseconds()
        clock.tick = UInt32(truncatingIfNeeded: (clock.milliseconds - clock.start) / Worker.tickMilliseconds)
    }

    @inline(__always)
    func handle(_ completion: Completion) {
        let userData = UserData(raw: completion.userData)
        guard let operation = userData.operation else { return }
        switch operation {
        case .accept: accepted(completion, listener: userData.listener, serial: userData.serial)
        case .connect: connected(completion, userData)
        case .receiveFromClient: received(completion, userData, toUpstream: true, large: false)
        case .receiveFromUpstream: received(completion, userData, toUpstream: false, large: false)
        case .receiveLargeFromClient: received(completion, userData, toUpstream: true, large: true)
        case .receiveLargeFromUpstream: received(completion, userData, toUpstream: false, large: true)
        case .sendToUpstream: sent(completion, userData, toUpstream: true)
        case .sendToClient: sent(completion, userData, toUpstream: false)
        case .sendProxyHeader: proxyHeaderSent(completion, userData)
        case .tick: ticked()
        case .wake: woken()
        case .listenerCancelled: listenerCancelled(fd: userData.descriptor)
        case .datagramFromClient: datagramFromClient(completion, listener: userData.listener, serial: userData.serial)
        case .datagramToUpstream: datagramSentUpstream(completion, buffer: userData.buffer, listener: userData.datagramListener)
        case .datagramFromUpstream: datagramFromUpstream(completion, userData)
        case .datagramToClient: datagramSentToClient(completion, buffer: userData.buffer, listener: userData.datagramListener)
        case .receiveCiphertextFromClient: receivedCiphertext(completion, userData, large: false, atUpstream: false)
        case .receiveLargeCiphertextFromClient: receivedCiphertext(completion, userData, large: true, atUpstream: false)
        case .sendCiphertextToClient: ciphertextSent(completion, userData, atUpstream: false)
        case .receiveCiphertextFromUpstream: receivedCiphertext(completion, userData, large: false, atUpstream: true)
        case .receiveLargeCiphertextFromUpstream: receivedCiphertext(completion, userData, large: true, atUpstream: true)
        case .sendCiphertextToUpstream: ciphertextSent(completion, userData, atUpstream: true)
        case .peekClientHello: peekedClientHello(completion, userData)
        case .clientHelloReadable: clientHelloReadable(completion, userData)
        case .linkTimeout, .cancel: break
        }
    }
}
