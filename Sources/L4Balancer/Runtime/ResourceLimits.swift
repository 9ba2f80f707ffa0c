import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Every proxied connection and every UDP session holds descriptors; the usual soft limit
/// of 1,024 would cap l4lb at ~500 connections. Raise the soft limit to the hard one, as
/// HAProxy does, and where l4lb may (root, CAP_SYS_RESOURCE) both up to `fs.nr_open`: the
/// kernel grows a process's descriptor table only as it is used.
public enum ResourceLimits {
    @discardableResult
    public static func raiseOpenFileLimit() -> Int {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0 else { return -1 }
        if let ceiling = systemCeiling(), ceiling > limit.rlim_max {
            var raised = rlimit(rlim_cur: ceiling, rlim_max: ceiling)
            if setrlimit(resource, &raised) == 0 { return Int(ceiling) }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            setrlimit(resource, &limit)
        }
        return Int(limit.rlim_cur)
    }

    /// Large allocations (a session table after a burst of clients, its index) get pages
    /// of their own, unmapped when freed: glibc would otherwise raise its mmap threshold as
    /// such blocks come and go, and keep later ones in the heap, fragmented, after their
    /// sessions are gone. Called once at start-up; growth is rare, so its syscalls are too.
    public static func returnLargeAllocationsToKernel() {
        _ = setMallocOption(mallocMmapThreshold, 128 << 10)
    }

    /// `fs.nr_open`, the most descriptors one process may have.
    static func systemCeiling() -> rlim_t? {
        guard let text = try? String(contentsOfFile: "/proc/sys/fs/nr_open", encoding: .utf8),
              let value = UInt(text.trimmingCharacters(in: .whitespacesAndNewlines)), value > 0
        else { return nil }
        return rlim_t(value)
    }
}

/// glibc's `mallopt` and its M_MMAP_THRESHOLD (not in Swift's Glibc module).
@_silgen_name("mallopt")
private func setMallocOption(_ option: Int32, _ value: Int32) -> Int32
private let mallocMmapThreshold: Int32 = -3
