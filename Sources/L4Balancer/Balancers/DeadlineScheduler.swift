/// Envoy's weighted round robin for large clusters: an earliest-deadline-first schedule.
/// Each endpoint's next deadline is `last + 1/weight`; a pick pops the earliest (ties by
/// index) and pushes it back one period later. O(log n) per pick, shares exact over a
/// cycle, interleaved smoothly. Deterministic for a given weight list.
public final class DeadlineScheduler {
    public typealias Entry = (deadline: Double, index: Int32)
    /// Fixed storage: the heap never grows past the endpoint count, so nothing allocates
    /// after init, in any build.
    @usableFromInline let heap: UnsafeMutablePointer<Entry>
    @usableFromInline var heapCount = 0
    /// Entries popped because they were excluded, pushed back after a pick.
    @usableFromInline let skipped: UnsafeMutablePointer<Entry>
    @usableFromInline let periods: UnsafeMutablePointer<Double>
    let capacity: Int

    public init(weights: [Int]) {
        capacity = max(weights.count, 1)
        heap = .allocate(capacity: capacity)
        skipped = .allocate(capacity: capacity)
        periods = .allocate(capacity: capacity)
        for (i, w) in weights.enumerated() {
            periods[i] = w > 0 ? 1 / Double(w) : .infinity
            if w > 0 { push((periods[i], Int32(i))) }
        }
    }

    deinit {
        heap.deallocate()
        skipped.deallocate()
        periods.deallocate()
    }

    @inlinable
    func less(_ a: Entry, _ b: Entry) -> Bool {
        a.deadline < b.deadline || (a.deadline == b.deadline && a.index < b.index)
    }

    @inlinable
    func push(_ entry: Entry) {
        var child = heapCount
        heapCount += 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard less(entry, heap[parent]) else { break }
            heap[child] = heap[parent]
            child = parent
        }
        heap[child] = entry
    }

    @inlinable
    func pop() -> Entry? {
        guard heapCount > 0 else { return nil }
        let first = heap[0]
        heapCount -= 1
        let last = heap[heapCount]
        var parent = 0
        while true {
            let left = 2 * parent + 1
            guard left < heapCount else { break }
            var child = left
            if left + 1 < heapCount, less(heap[left + 1], heap[left]) { child = left + 1 }
            guard less(heap[child], last) else { break }
            heap[parent] = heap[child]
            parent = child
        }
        if heapCount > 0 { heap[parent] = last }
        return first
    }

    /// The next index not in `tried`.
    @inlinable
    public func pick(tried: TriedEndpoints = 0, endpoints: EndpointView = .allAvailable) -> Int? {
        var chosen: Int?
        var skippedCount = 0
        while let entry = pop() {
            if !isEligible(Int(entry.index), tried, endpoints) {
                skipped[skippedCount] = entry
                skippedCount += 1
                continue
            }
            push((entry.deadline + periods[Int(entry.index)], entry.index))
            chosen = Int(entry.index)
            break
        }
        for i in 0..<skippedCount { push(skipped[i]) }
        return chosen
    }
}
