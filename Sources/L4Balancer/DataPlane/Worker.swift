import CLinux
import Logging
import URing

#if canImport(Glibc)
import Glibc
#endif

/// One data-plane worker: a thread with its own ring, listener sockets, connection slab,
/// buffer ring, balancers and counters. It shares nothing mutable with other workers
/// except the listeners' connection counts (`ListenerLimits`).
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

    // MARK: Buffers

    @inline(__always)
    func recycle(_ buffer: UInt16, large: Bool) {
        if large { largeBuffers.recycle(buffer) } else { smallBuffers.recycle(buffer) }
    }

    /// A completion named a buffer of this group: it is ours until recycled.
    @inline(__always)
    func handedOut(large: Bool) {
        if large { largeBuffers.handedOut() } else { smallBuffers.handedOut() }
    }

    @inline(__always)
    func bufferAddress(_ buffer: UInt16, large: Bool) -> UnsafeMutableRawPointer {
        large ? largeBuffers.address(of: buffer) : smallBuffers.address(of: buffer)
    }

    /// Publishes recycled buffers, then re-arms as many waiting receives as there are free
    /// small buffers: connections that are moving first (`BufferWaitQueue`).
    @inline(__always)
    func returnBuffers() {
        smallBuffers.publish()
        largeBuffers.publish()
        datagramBuffers.publish()
        if datagramReceivesWaiting, datagramBuffers.available > 0 { rearmDatagramReceives() }
        if waiters.count > 0 {
            // Each waiting direction at most once per pass: one whose re-arm fails goes
            // back to the end of the queue.
            var budget = min(smallBuffers.available, waiters.count)
            while budget > 0, let entry = waiters.pop() {
                let slot = entry / 2
                let toUpstream = entry & 1 == 0
                let record = slab[slot]
                // Only proxying connections wait; closing removes its entries.
                assert((record.pointee.state == .proxying || record.pointee.state == .handshaking || record.pointee.state == .upstreamHandshaking) && stream(record, toUpstream: toUpstream).pointee.state == .waitingForBuffer)
                armReceive(slot, record, toUpstream: toUpstream)
                budget -= 1
            }
        }
        // The most buffers in use at once: a shared store only when a peak is passed.
        if smallBuffers.inUse > smallBuffersPeak {
            smallBuffersPeak = smallBuffers.inUse
            stats.set(.smallBuffersPeak, UInt64(smallBuffersPeak))
        }
        if largeBuffers.inUse > largeBuffersPeak {
            largeBuffersPeak = largeBuffers.inUse
            stats.set(.largeBuffersPeak, UInt64(largeBuffersPeak))
        }
    }

    @inline(__always)
    func stream(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> UnsafeMutablePointer<Connection.Stream> {
        (UnsafeMutableRawPointer(record) + (toUpstream ? Worker.toUpstreamOffset : Worker.toClientOffset))
            .assumingMemoryBound(to: Connection.Stream.self)
    }

    /// The socket a direction reads from: the client's for bytes going upstream.
    @inline(__always)
    func source(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> Int32 {
        toUpstream ? record.pointee.client : record.pointee.upstream
    }

    /// The socket a direction writes to (and half-closes).
    @inline(__always)
    func destination(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool) -> Int32 {
        toUpstream ? record.pointee.upstream : record.pointee.client
    }

    // MARK: Control

    /// The timer tick and the control plane's wake-up read. Losing either would stop the
    /// timers or leave a drain request unseen, so a refusal is retried every loop.
    func armTick() {
        tickArmed = ring.prepareTimeout(tickTimeout, userData: UserData(.tick).raw)
        if !tickArmed { stats.add(.submissionDrops) }
    }

    func armWake() {
        wakeArmed = ring.prepareRead(fd: control.wakeFD, into: wakeCounter, length: 8, userData: UserData(.wake).raw)
        if !wakeArmed { stats.add(.submissionDrops) }
    }

    func woken() {
        armWake()
        if !draining, control.drainRequested.load(ordering: .acquiring) { startDrain() }
        let filter = filters.filter
        if filter !== sourceFilter {
            sourceFilter = filter
            // Every datagram must pass the user-space blocklist: the kernel gives its sessions back.
            if filter.enforcing { reclaimRelayedSessions() }
        }
        if !draining {
            let published = store.snapshot
            if published !== current.snapshot { adopt(published) }
        }
    }

    /// Stop accepting: the listening sockets stop listening at once (new SYNs are refused),
    /// established connections carry on.
    func startDrain() {
        draining = true
        for id in servedListeners { retireListener(id) }
        servedListeners = []
        logger.debug("worker draining", metadata: ["worker": "\(control.index)", "connections": "\(slab.active)"])
    }

    func ticked() {
        armTick()
        stats.set(.smallBuffersInUse, UInt64(smallBuffers.inUse))
        stats.set(.largeBuffersInUse, UInt64(largeBuffers.inUse))
        expireConnections()
        if !retriesAtTick.isEmpty { retryAtTick() }
        if !inputReleasesAtTick.isEmpty { releaseIdleInputMemory() }
        if udpSessions.active > 0 || !repliesToRearm.isEmpty { expireSessions() }
        if !relayedSessions.isEmpty { relayedActivityTick() }
        if closesOnUnhealthy { closeConnectionsToUnavailableEndpoints() }
        if !removedListeners.isEmpty { closeExpiredRemovedListeners() }
        if !draining, store.snapshot !== current.snapshot { adopt(store.snapshot) }
        if draining {
            if !forcedClose, nowMilliseconds >= control.drainDeadline.load(ordering: .relaxed) {
                forcedClose = true
                closeAll()
            }
        } else {
            // Accepts that stopped on an error (EMFILE and the like) retry once per tick.
            for id in servedListeners where !acceptArmed[id] { armAccept(id) }
        }
    }

    /// Whether the connection a tick-time list entry named (`slot` at `generation`) is
    /// still open: not closed, closing, or the slot reused since.
    @inline(__always)
    func stillOpen(_ record: UnsafeMutablePointer<Connection>, generation: UInt32) -> Bool {
        record.pointee.generation == generation && record.pointee.state != .closing && record.pointee.state != .free
    }

    /// Steps that found no free small buffer (a TLS flush, a ClientHello peek), retried
    /// once per tick.
    func retryAtTick() {
        let waiting = retriesAtTick
        retriesAtTick.removeAll(keepingCapacity: true)
        for (slot, generation) in waiting {
            let record = slab[slot]
            guard stillOpen(record, generation: generation) else { continue }
            if record.pointee.state == .inspecting {
                peekClientHello(slot, record)
                continue
            }
            if record.pointee.tls { retryTLS(slot, record, generation: generation, atUpstream: false) }
            if record.pointee.upstreamTLS { retryTLS(slot, record, generation: generation, atUpstream: true) }
        }
    }

    /// One TLS side's step that waited for the tick: an unsent ciphertext buffer, the PROXY
    /// v2 header, plaintext OpenSSL holds, or ciphertext to flush.
    private func retryTLS(_ slot: UInt32, _ record: UnsafeMutablePointer<Connection>, generation: UInt32, atUpstream: Bool) {
        guard stillOpen(record, generation: generation) else { return }
        let t = tlsSlot(slot, atUpstream: atUpstream)
        let state = record.pointee.state
        if t.pointee.cipherUnsent {
            sendCiphertext(slot, record, atUpstream: atUpstream)
        } else if !atUpstream, state == .sendingProxyHeader, t.pointee.headerUnwritten {
            startTLSProxyHeader(slot, record)
        } else if state == .proxying {
            let source = stream(record, toUpstream: !atUpstream).pointee.state
            if source == .receiving || source == .waitingForBuffer { pullPendingPlaintext(slot, record, atUpstream: atUpstream) }
            if record.pointee.state == .proxying { encryptFor(slot, record, atUpstream: atUpstream) }
        } else {
            flushCiphertext(slot, record, atUpstream: atUpstream)
        }
    }

    /// Due timer buckets: each connection in one is closed if it has been idle (no bytes
    /// either way) for `idle_timeout`, or a send of it has made no progress for
    /// `send_timeout`; otherwise it is filed again at its next deadline.
    func expireConnections() {
        while let head = wheel.takeNextDueBucket(now: nowTick) {
            var cursor = head
            while cursor != 0 {
                let slot = cursor - 1
                let record = slab[slot]
                cursor = record.pointee.timerNext
                record.pointee.timerBucket = UInt32.max
                record.pointee.timerPrevious = 0
                record.pointee.timerNext = 0
                let state = record.pointee.state
                guard state != .free, state != .closing else { continue }
                let listener = Int(record.pointee.listener)
                switch timerCheck(record, plan: plans[Int(record.pointee.plan)].unsafelyUnwrapped, listener: listener) {
                case .idle:
                    stats.add(.idleTimeouts, listener: listener)
                    close(slot, reason: .idleTimeout)
                case .stalledSend:
                    stats.add(.sendTimeouts, listener: listener)
                    // Give up on the peer: reset rather than leave the kernel holding
                    // unsent bytes for a reader that may never come back.
                    resetOnClose(record)
                    close(slot, reason: .sendTimeout)
                case .openingTimeout:
                    switch record.pointee.state {
                    case .inspecting: stats.add(.sniTimeouts, listener: listener)
                    case .upstreamHandshaking:
                        upstreamHandshakeFailed(record)
                        stats.add(.connectTimeouts, endpoint: Int(record.pointee.endpoint))
                    default: stats.add(.tlsHandshakeTimeouts, listener: listener)
                    }
                    close(slot, reason: .idleTimeout)
                case .refile(let deadline):
                    wheel.insert(slot, deadline: deadline, in: slab)
                }
            }
        }
    }

    enum TimerVerdict {
        case idle, stalledSend, openingTimeout
        case refile(UInt32)
    }

    /// What a connection's timers say now. With no send in flight the next check is one
    /// send timeout away, so a send that starts later is still caught in time.
    @inline(__always)
    func timerCheck(_ record: UnsafeMutablePointer<Connection>, plan: WorkerPlan, listener: Int) -> TimerVerdict {
        if record.pointee.state == .handshaking || record.pointee.state == .inspecting || record.pointee.state == .upstreamHandshaking {
            let limit = record.pointee.state == .upstreamHandshaking ? plan.connectTicks[listener] : plan.openingTicks[listener]
            let elapsed = nowTick &- record.pointee.lastActivity
            return elapsed >= limit ? .openingTimeout : .refile(record.pointee.lastActivity &+ limit)
        }
        let idle = plan.idleTicks[listener]
        let send = plan.sendTicks[listener]
        var next = UInt32.max
        if idle > 0 {
            var deadline = record.pointee.lastActivity &+ idle
            if deadline <= nowTick {
                // The peer still taking what l4lb handed the kernel long ago is progress
                // too: a slow reader draining a large socket buffer is not idle.
                let sent = min(ticksSincePeerTookData(record.pointee.client), ticksSincePeerTookData(record.pointee.upstream))
                guard sent < idle else { return .idle }
                deadline = nowTick &+ (idle - sent)
            }
            next = deadline
        }
        if send > 0 {
            let up = sendDeadline(record, toUpstream: true, send: send)
            let down = sendDeadline(record, toUpstream: false, send: send)
            guard let up, let down else { return .stalledSend }
            next = min(next, up, down)
        }
        return .refile(next)
    }

    /// When a direction's send next needs a look, or nil when it has stalled for
    /// `send_timeout`: by then the peer must also have taken no data from the kernel for as
    /// long (a peer draining a large socket buffer is reading, though l4lb's send waits
    /// for room all along; window probes to a peer that reads nothing are not data, and
    /// retransmissions to a peer that acknowledges nothing are not progress).
    @inline(__always)
    func sendDeadline(_ record: UnsafeMutablePointer<Connection>, toUpstream: Bool, send: UInt32) -> UInt32? {
        let s = stream(record, toUpstream: toUpstream)
        guard s.pointee.isSending else { return nowTick &+ send }
        let due = s.pointee.sendProgress &+ send
        if due > nowTick { return due }
        let sent = ticksSincePeerTookData(destination(record, toUpstream: toUpstream))
        guard sent < send else { return nil }
        s.pointee.sendProgress = nowTick &- sent
        return nowTick &+ (send - sent)
    }

    /// Timer ticks since the socket's peer last took data (TCP_INFO; see
    /// `CLinux_tcp_ms_since_progress`).
    @inline(__always)
    func ticksSincePeerTookData(_ fd: Int32) -> UInt32 {
        guard fd >= 0 else { return .max }
        let milliseconds = CLinux_tcp_ms_since_progress(fd)
        return milliseconds == .max ? .max : milliseconds / UInt32(Worker.tickMilliseconds)
    }

    /// Files a new connection under its first timer deadline, if it has any timer.
    @inline(__always)
    func startTimers(_ slot: UInt32, listener: Int) {
        let idle = current.idleTicks[listener]
        let send = current.sendTicks[listener]
        let handshake = current.openingTicks[listener]
        guard idle > 0 || send > 0 || handshake > 0 else { return }
        let first = min(idle == 0 ? UInt32.max : idle, send == 0 ? UInt32.max : send, handshake == 0 ? UInt32.max : handshake)
        wheel.insert(slot, deadline: nowTick &+ first, in: slab)
    }

    /// `on_unhealthy: close`: after an endpoint stops being available, close what is open
    /// to it (checked once per tick, only when something changed).
    func closeConnectionsToUnavailableEndpoints() {
        let epoch = status.unavailableEpoch.load(ordering: .acquiring)
        guard epoch != seenUnavailableEpoch else { return }
        seenUnavailableEpoch = epoch
        for index in 0..<slab.highWater {
            let record = slab[UInt32(index)]
            let endpoint = Int(record.pointee.endpoint)
            guard endpoint >= 0, record.pointee.state != .free, record.pointee.state != .closing,
                  plans[Int(record.pointee.plan)].unsafelyUnwrapped.closeOnUnhealthy[Int(record.pointee.cluster)],
                  !status.flags(endpoint).isDisjoint(with: [.unhealthy, .ejected, .markedUnhealthy])
            else { continue }
            stats.add(.closedUnhealthy, listener: Int(record.pointee.listener))
            close(UInt32(index), reason: .unhealthy)
        }
    }

    func closeAll() {
        logger.info("drain timeout reached, closing \(slab.active) connections", metadata: ["worker": "\(control.index)"])
        for index in 0..<slab.highWater {
            let state = slab[UInt32(index)].pointee.state
            if state != .free, state != .closing { close(UInt32(index), reason: .drain) }
        }
    }
}
