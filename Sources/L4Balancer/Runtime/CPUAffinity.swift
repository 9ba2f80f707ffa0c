import CLinux

/// The CPUs this process may run on (`sched_getaffinity`), so `taskset`, systemd's
/// `CPUAffinity=` and cgroup pinning are respected, and pinning a thread to one of them.
enum CPUAffinity {
    static func allowedCPUs() -> [Int] {
        var cpus = [Int32](repeating: 0, count: 4096)
        let count = CLinux_allowed_cpus(&cpus, Int32(cpus.count))
        return count > 0 ? cpus[..<Int(count)].map(Int.init) : [0]
    }

    /// Pins the calling thread to `cpu`.
    @discardableResult
    static func pinCurrentThread(to cpu: Int) -> Bool {
        CLinux_pin_current_thread(Int32(cpu)) == 0
    }
}
