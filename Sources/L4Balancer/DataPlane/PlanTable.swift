/// The plans a worker's connections run under (`WorkerPlan`), by `WorkerPlan.index`.
///
/// Invariants:
/// - `current` is the plan new connections are opened under, and is always in
///   `byIndex` at its own index.
/// - An older plan stays in `byIndex` until its last connection closes; then its index
///   goes to `freeIndices` for the next reload. `liveCount` counts the non-nil entries.
/// - A connection's `plan` field indexes a live entry for as long as the connection holds
///   its slot, so `self[index]` needs no check on the data path.
struct PlanTable {
    private(set) var current: WorkerPlan
    private var byIndex: [WorkerPlan?]
    private var freeIndices: [UInt16] = []
    private(set) var liveCount = 1
    /// Whether any live plan closes connections to endpoints that turn unhealthy.
    var closesOnUnhealthy = false
    /// The endpoint-status epoch last acted on by `closeUnavailable`.
    var seenUnavailableEpoch: UInt64 = 0
    /// Resumable sessions with TLS endpoints, one per endpoint identity, shared by the
    /// plans (a reload keeps them).
    let upstreamSessions = UpstreamSessions(capacity: IdentityRegistry.endpointCapacity)

    init(snapshot: Snapshot, worker: Int) {
        current = WorkerPlan(snapshot: snapshot, index: 0, worker: worker, previous: nil, sessions: upstreamSessions)
        byIndex = [current]
    }

    /// The live plan at `index` (a connection's `plan`).
    subscript(index: UInt16) -> WorkerPlan {
        @inline(__always) get { byIndex[Int(index)].unsafelyUnwrapped }
    }

    /// Every live plan.
    var live: some Sequence<WorkerPlan> { byIndex.lazy.compactMap { $0 } }

    /// Makes a plan for `snapshot` the current one and returns the one it replaces; nil
    /// when 65,535 plans are alive at once (the current one is then kept until older
    /// ones close).
    mutating func adopt(_ snapshot: Snapshot, worker: Int) -> WorkerPlan? {
        let index: UInt16
        if let free = freeIndices.popLast() {
            index = free
        } else if byIndex.count < Int(UInt16.max) {
            index = UInt16(byIndex.count)
            byIndex.append(nil)
        } else {
            return nil
        }
        let plan = WorkerPlan(snapshot: snapshot, index: index, worker: worker, previous: current, sessions: upstreamSessions)
        byIndex[Int(index)] = plan
        let previous = current
        current = plan
        liveCount += 1
        return previous
    }

    /// Frees `plan`, which has no connections left and is not current.
    mutating func free(_ plan: WorkerPlan) {
        precondition(plan !== current, "the current plan is never freed")
        byIndex[Int(plan.index)] = nil
        freeIndices.append(plan.index)
        liveCount -= 1
    }
}
