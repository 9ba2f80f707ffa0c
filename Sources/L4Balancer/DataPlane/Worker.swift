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

    let store: SnapshotStore
    let filters: FilterStore
    /// The blocklist as enforced in user space (`enforcing` is false while XDP does it).
    var sourceFilter: SourceFilter
    let control: WorkerControl
    let limits: ListenerLimits
    let status: EndpointStatus
    let stats: WorkerStats
    var seenUnavailableEpoch: UInt64 = 0
    var random: FastRandom
    let logger: Logger
    let ring: Ring
    /// Receive buffers in two sizes: a direction starts with small ones (request/response
    /// traffic stays cache-friendly) and moves to large ones once a read fills a small
    /// buffer (bulk transfers: fewer, bigger reads and sends).
    var smallBuffers: ProvidedBufferRing
    var largeBuffers: ProvidedBufferRing
    /// UDP: datagram buffers (room for 65,507 bytes each; only touched pages are resident),
    /// the recvmsg header every UDP listener's receive uses, and per buffer the sendmsg
    /// header, vector and client address of the reply it carries.
    var datagramBuffers: ProvidedBufferRing
    let datagramHeader: UnsafeMutablePointer<msghdr>
    let datagramReplies: UnsafeMutablePointer<msghdr>
    let datagramReplyNames: UnsafeMutablePointer<sockaddr_in6>
    let datagramReplyVectors: UnsafeMutablePointer<iovec>
    /// Per datagram buffer: a reply's IP_PKTINFO, for listeners bound to a wildcard address.
    let datagramReplyControls: UnsafeMutableRawPointer
    var udpSessions = UDPSessionTable(listeners: IdentityRegistry.listenerCapacity)
    var repliesToRearm: [UInt32] = []
    /// `relay: kernel`: sessions the kernel carries, by slot; when their counts were last
    /// folded, and which share of them the next fold takes.
    var relayedSessions: [UInt32: RelayedSession] = [:]
    var lastRelayFoldTick: UInt32 = 0
    var relayFoldPhase: UInt32 = 0
    var relayFoldSlots: [UInt32] = []
    /// A datagram receive stopped for want of a buffer: re-armed as soon as one is free.
    var datagramReceivesWaiting = false
    /// Upstream UDP sockets of ended sessions, closed once the batch that may still send
    /// on them is submitted.
    var upstreamsToClose: [Int32] = []
    /// Per listener identity: served with recvmsg (UDP) rather than accept.
    var listenerIsDatagram: [Bool]
    /// Whether small receives are multishot with a total limit (Linux 6.16); without it
    /// they are single-shot, which keeps the same per-direction bound.
    let multishotSmallReceives: Bool
    var slab: ConnectionSlab
    /// Per slot: OpenSSL state of TLS connections (reserved; touched only by them).
    let tlsSlots: UnsafeMutablePointer<TLSSlot>
    /// Per slot: the source-table slot + 1 of a connection holding a `rate_limit`
    /// `max_connections` place (reserved; touched only by those).
    let sourcePlaces: UnsafeMutablePointer<UInt32>
    /// Per slot: OpenSSL state of TLS to the upstream (clusters with `tls:`).
    let upstreamTLSSlots: UnsafeMutablePointer<TLSSlot>
    /// Resumable sessions with TLS endpoints, one per endpoint identity.
    let upstreamSessions = UpstreamSessions(capacity: IdentityRegistry.endpointCapacity)
    /// Connections whose next step found no free small buffer (`retryAtTick`).
    var retriesAtTick: [(slot: UInt32, generation: UInt32)] = []
    /// TLS sides whose input BIO a large read drained (`releaseIdleInputMemory`).
    var inputReleasesAtTick: [(slot: UInt32, generation: UInt32, atUpstream: Bool)] = []
    var wheel: TimerWheel
    var waiters: BufferWaitQueue
    /// Per slot: endpoints at index 64 and above already tried (`Connection.tried` has a
    /// bit for each below 64), up to `maximumAttempts`. Reserved, touched only by
    /// connections to clusters that large.
    let triedAbove64: UnsafeMutablePointer<UInt16>
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

    /// The plan new connections are opened under, and every plan still alive, by
    /// `WorkerPlan.index` (older ones stay until their last connection closes).
    var current: WorkerPlan
    var plans: [WorkerPlan?]
    var freePlanIndices: [UInt16] = []
    var livePlanCount = 1
    /// Per listener identity: this worker's listening socket (-1: none), whether its
    /// multishot accept is armed, and a serial that tells a retired socket's accept
    /// completions from those of the socket that replaced it.
    var listenerFDs: [Int32]
    var acceptArmed: [Bool]
    var listenerSerials: [UInt32]
    /// Listener sockets the current plan serves (identities).
    var servedListeners: [Int] = []
    /// Shut-down listener sockets whose accept cancel is in flight: closed when it
    /// completes, never before (a cancel by descriptor must not find a reused number).
    var retiringListenerFDs = Set<Int32>()
    /// Listeners a reload removed: their connections opened before `generation` are closed
    /// at `deadline` (monotonic ms) if still open.
    var removedListeners: [(listener: Int, generation: UInt64, deadline: Int64)] = []
    /// The access log's hand-off ring and per-slot bookkeeping; nil when it is off (then
    /// the data path does nothing for it but test these for nil).
    let accessLog: AccessLogRing?
    let accessSlots: UnsafeMutablePointer<AccessSlot>?
    /// Whether any live plan closes connections to endpoints that turn unhealthy.
    var closesOnUnhealthy = false
    /// This worker's connections (connecting or connected) per endpoint and per cluster
    /// identity, for least-request and bounded-load picks.
    let activeByEndpoint: UnsafeMutablePointer<Int32>
    let activeByCluster: UnsafeMutablePointer<Int>

    // Memory the kernel reads at submit time, allocated once.
    let tickTimeout: UnsafeMutablePointer<Timeout>
    let wakeCounter: UnsafeMutablePointer<UInt64>
    let proxyHeaders: UnsafeMutableRawPointer
    let completions: UnsafeMutableBufferPointer<Completion>

    var nowMilliseconds: Int64
    var nowTick: UInt32
    let startMilliseconds: Int64
    var draining = false
    var forcedClose = false
    /// When a resource error was last logged (monotonic ms; 0 = never).
    var lastResourceWarning: Int64 = 0
    var tickArmed = false
    var wakeArmed = false
    var smallBuffersPeak = 0
    var largeBuffersPeak = 0
    /// How long the worker lets completions gather before it is woken (0: woken for each).
    let batchWindowMicroseconds: UInt32
    /// Completions found by one wake-up that switch the window on for the next wait.
    let batchThreshold: Int
    /// Completions handled since the last wait: the load signal for batched waits.
    var lastBatch = 0

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
        self.store = store
        self.filters = filters
        sourceFilter = filters.filter
        self.control = control
        self.limits = limits
        self.status = status
        self.stats = control.stats
        random = FastRandom(seed: UInt64(control.index) &+ 0x5EED)
        self.logger = logger
        let snapshot = store.snapshot
        current = WorkerPlan(snapshot: snapshot, index: 0, worker: control.index, previous: nil, sessions: upstreamSessions)
        plans = [current]
        listenerFDs = Array(repeating: -1, count: IdentityRegistry.listenerCapacity)
        acceptArmed = Array(repeating: false, count: IdentityRegistry.listenerCapacity)
        listenerSerials = Array(repeating: 0, count: IdentityRegistry.listenerCapacity)
        self.ring = try Ring(entries: options.ringEntries)
        let buffers = options.buffers
        self.smallBuffers = try ProvidedBufferRing(
            ring: ring, group: Worker.smallBufferGroup, count: buffers.small, bufferSize: buffers.smallSize,
            window: Options.window(for: buffers.small, cap: options.smallBufferWindow),
            // For TLS: ciphertext to clients, PROXY v2 headers with TLVs, plaintext read
            // ahead (`take`); the kernel's ring never holds these.
            reserve: min(256, max(4, buffers.small / 16)))
        self.largeBuffers = try ProvidedBufferRing(
            ring: ring, group: Worker.largeBufferGroup, count: buffers.large, bufferSize: buffers.largeSize,
            window: Options.window(for: buffers.large, cap: 32768),
            // Plaintext read from a TLS side starts here, behind the ciphertext (Worker+TLS).
            headroom: Worker.plaintextHeadroom)
        self.datagramBuffers = try ProvidedBufferRing(
            ring: ring, group: Worker.datagramBufferGroup, count: Worker.datagramBufferCount, bufferSize: Worker.datagramBufferSize)
        datagramHeader = .allocate(capacity: 1)
        datagramHeader.initialize(to: msghdr())
        datagramHeader.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
        // Room for IP_PKTINFO / IPV6_PKTINFO (only wildcard-bound listeners ask for it).
        datagramHeader.pointee.msg_controllen = Worker.datagramControlLength
        datagramReplies = .allocate(capacity: Worker.datagramBufferCount)
        datagramReplies.initialize(repeating: msghdr(), count: Worker.datagramBufferCount)
        datagramReplyNames = .allocate(capacity: Worker.datagramBufferCount)
        datagramReplyNames.initialize(repeating: sockaddr_in6(), count: Worker.datagramBufferCount)
        datagramReplyVectors = .allocate(capacity: Worker.datagramBufferCount)
        datagramReplyVectors.initialize(repeating: iovec(), count: Worker.datagramBufferCount)
        datagramReplyControls = .allocate(byteCount: Worker.datagramBufferCount * PacketDestination.controlSpace, alignment: 8)
        listenerIsDatagram = Array(repeating: false, count: IdentityRegistry.listenerCapacity)
        multishotSmallReceives = ring.capabilities.multishotReceiveLimit

        let shares = snapshot.listeners.reduce(0) { $0 + ($1.maxConnections ?? Config.Listener.defaultCapacity) }
        let capacity = min(max(shares, Worker.minimumCapacity), 1 << 22)
        slab = ConnectionSlab(capacity: capacity)
        tlsSlots = reserve(TLSSlot.self, capacity)
        sourcePlaces = reserve(UInt32.self, capacity)
        upstreamTLSSlots = reserve(TLSSlot.self, capacity)
        accessLog = control.accessLog
        accessSlots = control.accessLog == nil ? nil : reserve(AccessSlot.self, capacity)
        waiters = BufferWaitQueue(slots: capacity)
        guard let side = mmap(nil, capacity * Worker.triedStride * 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              side != MAP_FAILED
        else { throw Errno.current }
        triedAbove64 = side.bindMemory(to: UInt16.self, capacity: capacity * Worker.triedStride)
        startMilliseconds = monotonicMilliseconds()
        nowMilliseconds = startMilliseconds
        nowTick = 0
        wheel = TimerWheel(now: 0)
        activeByEndpoint = reserve(Int32.self, IdentityRegistry.endpointCapacity)
        activeByCluster = reserve(Int.self, IdentityRegistry.clusterCapacity)
        tickTimeout = .allocate(capacity: 1)
        tickTimeout.initialize(to: Timeout(milliseconds: Worker.tickMilliseconds))
        wakeCounter = .allocate(capacity: 1)
        wakeCounter.initialize(to: 0)
        // Reserved, not touched: only headers actually written become resident.
        proxyHeaders = mmap(nil, capacity * ProxyProtocolHeader.capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        completions = .allocate(capacity: Int(Worker.completionBatch))
        // L4LB_BATCH_US sets the window (0: wake for every completion), L4LB_BATCH_MIN the
        // load that turns it on; the kernel must support batched waits (6.12).
        let window = getenv("L4LB_BATCH_US").flatMap { UInt32(String(cString: $0)) } ?? Worker.defaultBatchWindowMicroseconds
        batchWindowMicroseconds = ring.capabilities.batchWait ? window : 0
        batchThreshold = getenv("L4LB_BATCH_MIN").flatMap { Int(String(cString: $0)) } ?? Worker.defaultBatchThreshold
    }

    deinit {
        // Explicitly, while the ring is alive: stored properties are destroyed after this
        // body, in an order the language does not promise.
        smallBuffers.unregister(from: ring)
        largeBuffers.unregister(from: ring)
        datagramBuffers.unregister(from: ring)
        datagramHeader.deallocate()
        datagramReplies.deallocate()
        datagramReplyNames.deallocate()
        datagramReplyVectors.deallocate()
        datagramReplyControls.deallocate()
        slab.deallocate()
        wheel.deallocate()
        waiters.deallocate()
        munmap(triedAbove64, slab.capacity * Worker.triedStride * 2)
        munmap(tlsSlots, slab.capacity * MemoryLayout<TLSSlot>.stride)
        munmap(upstreamTLSSlots, slab.capacity * MemoryLayout<TLSSlot>.stride)
        if let accessSlots { munmap(accessSlots, slab.capacity * MemoryLayout<AccessSlot>.stride) }
        munmap(activeByEndpoint, IdentityRegistry.endpointCapacity * MemoryLayout<Int32>.stride)
        munmap(activeByCluster, IdentityRegistry.clusterCapacity * MemoryLayout<Int>.stride)
        tickTimeout.deallocate()
        wakeCounter.deallocate()
        munmap(proxyHeaders, slab.capacity * ProxyProtocolHeader.capacity)
        completions.deallocate()
    }

    /// Milliseconds as timer ticks, rounded up (0 stays 0: no timeout).
    static func ticks(_ milliseconds: Int64) -> UInt32 {
        milliseconds <= 0 ? 0 : UInt32(min(max(1, (milliseconds + tickMilliseconds - 1) / tickMilliseconds), Int64(UInt32.max / 2)))
    }

    // MARK: Loop

    /// Runs until a drain has closed every connection.
    func run() {
        serve(current.snapshot)
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
                let count = ring.reap(into: completions)
                for i in 0..<count { handle(completions[i]) }
                handled += count
                if count < completions.count { break }
            }
            lastBatch = handled
            returnBuffers()
            // The worker's own requests, if the submission queue refused them.
            if !tickArmed { armTick() }
            if !wakeArmed { armWake() }
        }
        endAllSessions()
        _ = ring.submitPending()
        closeEndedUpstreams()
        for id in servedListeners where listenerFDs[id] >= 0 { Glibc.close(listenerFDs[id]) }
        for fd in retiringListenerFDs { Glibc.close(fd) }
        logger.debug("worker stopped", metadata: ["worker": "\(control.index)"])
    }

    @inline(never)
    func waitForCompletions() throws(Errno) {
        if batchWindowMicroseconds > 0, lastBatch >= batchThreshold {
            try ring.submitAndWait(batch: Worker.completionBatch, windowMicroseconds: batchWindowMicroseconds, timeoutMilliseconds: 1000)
        } else {
            try ring.submitAndWait(minimum: 1)
        }
        closeEndedUpstreams()
    }

    /// Every queued request naming them has been submitted (and holds its own reference).
    @inline(__always)
    func closeEndedUpstreams() {
        guard !upstreamsToClose.isEmpty else { return }
        for fd in upstreamsToClose { Glibc.close(fd) }
        upstreamsToClose.removeAll(keepingCapacity: true)
    }

    @inline(__always)
    func updateClock() {
        nowMilliseconds = monotonicMilliseconds()
        nowTick = UInt32(truncatingIfNeeded: (nowMilliseconds - startMilliseconds) / Worker.tickMilliseconds)
    }

    @inline(__always)
    func handle(_ completion: Completion) {
        let userData = UserData(raw: completion.userData)
        guard let operation = userData.operation else { return }
        switch operation {
        case .accept: accepted(completion, listener: Int(userData.slot), serial: userData.generation)
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
        case .listenerCancelled: listenerCancelled(fd: Int32(bitPattern: userData.slot))
        case .datagramFromClient: datagramFromClient(completion, listener: Int(userData.slot), serial: userData.generation)
        case .datagramToUpstream: datagramSentUpstream(completion, buffer: UInt16(truncatingIfNeeded: userData.slot), listener: Int(userData.generation))
        case .datagramFromUpstream: datagramFromUpstream(completion, userData)
        case .datagramToClient: datagramSentToClient(completion, buffer: UInt16(truncatingIfNeeded: userData.slot), listener: Int(userData.generation))
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
