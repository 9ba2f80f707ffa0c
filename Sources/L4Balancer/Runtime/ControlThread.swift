import CLinux
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One thread for blocking or heavy control-plane work (the admin API's reloads and drains;
/// an xDS stream's updates: decoding, mapping, building snapshots). Jobs run one at a time,
/// in order.
///
/// Its priority is below the workers': nice 10, or with `background` the idle class
/// (SCHED_IDLE), where it runs only on CPU time nothing else wants and any waking worker
/// preempts it at once, so a burst of control work never stalls a worker's connections.
/// On a saturated machine that could starve it, so a watchdog bounds the wait: work pending
/// for more than `patience` lifts the thread to nice 10 until its queue is empty.
final class ControlThread: @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [() -> Void] = []
    /// Guarded by `condition`: when the thread last went from idle to having work (0: idle),
    /// its kernel id, and whether the watchdog lifted it.
    private var busySince: Int64 = 0
    private var threadID: Int32 = 0
    private var lifted = false
    private let niceness: Int32

    init(name: String, niceness: Int32 = 10, background: Bool = false, patience milliseconds: Int64 = 250) {
        self.niceness = niceness
        let thread = Thread { [self] in
            let id = CLinux_current_thread_id()
            // Only this thread: on Linux a thread's nice value and policy are its own.
            _ = CLinux_set_current_thread_nice(niceness)
            if background { _ = CLinux_set_thread_idle(0, 1, niceness) }
            condition.lock()
            threadID = id
            condition.unlock()
            while true {
                condition.lock()
                if jobs.isEmpty {
                    busySince = 0
                    if lifted {
                        lifted = false
                        _ = CLinux_set_thread_idle(0, 1, niceness)
                    }
                }
                while jobs.isEmpty { condition.wait() }
                let job = jobs.removeFirst()
                condition.unlock()
                job()
            }
        }
        thread.name = name
        thread.start()
        if background { startWatchdog(name: name, patience: milliseconds) }
    }

    /// Runs `work` on the thread and returns its result (the caller waits, off the thread).
    func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (done: CheckedContinuation<T, Never>) in
            condition.lock()
            jobs.append { done.resume(returning: work()) }
            if busySince == 0 { busySince = monotonicMilliseconds() }
            condition.broadcast()
            condition.unlock()
        }
    }

    /// Every `patience / 5` while work is pending: past `patience`, the thread leaves the
    /// idle class (nice `niceness`) until its queue is empty.
    private func startWatchdog(name: String, patience: Int64) {
        let watchdog = Thread { [self] in
            while true {
                condition.lock()
                while busySince == 0 || lifted { condition.wait() }
                let waited = monotonicMilliseconds() - busySince
                if waited >= patience, threadID != 0 {
                    lifted = CLinux_set_thread_idle(threadID, 0, niceness) == 0
                }
                let stillWaiting = !lifted
                condition.unlock()
                // Not lifted (not yet due, or not permitted): look again shortly.
                if stillWaiting { usleep(UInt32(max(patience / 5, 1)) * 1000) }
            }
        }
        watchdog.name = name + "-watchdog"
        watchdog.start()
    }
}
