import URing

/// The worker's clock: monotonic milliseconds and 100 ms timer ticks since the worker
/// started, read once per loop iteration (`Worker.updateClock`), so every event of a
/// batch sees the same time.
struct WorkerClock {
    let start: Int64
    var milliseconds: Int64
    var tick: UInt32 = 0

    init(now: Int64) {
        start = now
        milliseconds = now
    }
}

/// What the event loop itself keeps: the completion batch it reaps into, the memory its
/// own requests (the tick's timeout, the wake eventfd's counter) hand the kernel, whether
/// those requests are armed, and the batched-wait setting.
///
/// Invariants: `tickArmed` and `wakeArmed` are true exactly while that request is in the
/// kernel; the loop re-arms either at the end of an iteration if it is not.
struct LoopState {
    let completions: UnsafeMutableBufferPointer<Completion>
    let tickTimeout: UnsafeMutablePointer<Timeout>
    let wakeCounter: UnsafeMutablePointer<UInt64>
    var tickArmed = false
    var wakeArmed = false
    /// How long the worker lets completions gather before it is woken (0: woken for each).
    let batchWindowMicroseconds: UInt32
    /// Completions found by one wake-up that switch the window on for the next wait.
    let batchThreshold: Int
    /// Completions handled since the last wait: the load signal for batched waits.
    var lastBatch = 0

    init(batch: UInt32, tickMilliseconds: Int64, batchWindowMicroseconds: UInt32, batchThreshold: Int) {
        completions = .allocate(capacity: Int(batch))
        tickTimeout = .allocate(capacity: 1)
        tickTimeout.initialize(to: Timeout(milliseconds: tickMilliseconds))
        wakeCounter = .allocate(capacity: 1)
        wakeCounter.initialize(to: 0)
        self.batchWindowMicroseconds = batchWindowMicroseconds
        self.batchThreshold = batchThreshold
    }

    func deallocate() {
        completions.deallocate()
        tickTimeout.deallocate()
        wakeCounter.deallocate()
    }
}

/// Where a worker is in a drain: serving; draining (no new connections, waiting for open
/// ones to finish); or past the drain deadline, closing what is still open.
enum DrainPhase {
    case serving
    case draining
    case forcing
}
