#if canImport(Glibc)
import Glibc
#endif

/// Every proxied connection holds two descriptors; the usual soft limit of 1,024 would
/// cap l4lb at ~500 connections. Raise the soft limit to the hard one, as HAProxy does.
public enum ResourceLimits {
    @discardableResult
    public static func raiseOpenFileLimit() -> Int {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0 else { return -1 }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            setrlimit(resource, &limit)
        }
        return Int(limit.rlim_cur)
    }
}
