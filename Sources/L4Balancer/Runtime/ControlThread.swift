import CLinux
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One thread for blocking or heavy control-plane work (the admin API's reloads and drains;
/// an xDS stream's updates: decoding, mapping, building snapshots), below the workers'
/// priority (nice 10): on a busy machine it takes what the data plane leaves rather than
/// preempting a worker. Jobs run one at a time, in order.
final class ControlThread: @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [() -> Void] = []

    init(name: String, niceness: Int32 = 10) {
        let thread = Thread { [condition] in
            // Only this thread: on Linux a thread's nice value is its own.
            _ = CLinux_set_current_thread_nice(niceness)
            while true {
                condition.lock()
                while self.jobs.isEmpty { condition.wait() }
                let job = self.jobs.removeFirst()
                condition.unlock()
                job()
            }
        }
        thread.name = name
        thread.start()
    }

    /// Runs `work` on the thread and returns its result (the caller waits, off the thread).
    func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (done: CheckedContinuation<T, Never>) in
            condition.lock()
            jobs.append { done.resume(returning: work()) }
            condition.signal()
            condition.unlock()
        }
    }
}
