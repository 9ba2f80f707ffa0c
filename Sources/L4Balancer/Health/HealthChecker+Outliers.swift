import Atomics
import Logging

/// Passive outlier detection: endpoints ejected on their connect failures, as the workers
/// (and the kernel forwarder) count them, on the health checker's thread.
extension HealthChecker {
    /// Reads the workers' connect counters: an endpoint whose connects failed
    /// `consecutive_failures` times with no success in between is ejected for
    /// `ejection_time`, doubled on each repeat up to `max_ejection_time`, unless that
    /// would eject more than `max_ejection_percent` of its cluster.
    func sweepOutliers(now: Int64) {
        for k in outliers.indices {
            let e = outliers[k].endpoint
            let kernel = kernelConnects?(e)
            let failures = workerStats.total(.connectFailures, endpoint: e) &+ (kernel?.failures ?? 0)
            let successes = workerStats.total(.total, endpoint: e) &+ (kernel?.successes ?? 0)
            let detection = outliers[k].detection
            if successes != outliers[k].lastSuccesses {
                outliers[k].lastSuccesses = successes
                outliers[k].failuresAtLastSuccess = failures
            }
            if outliers[k].ejectedUntil > 0 {
                guard now >= outliers[k].ejectedUntil else { continue }
                outliers[k].ejectedUntil = 0
                outliers[k].returnedAt = now
                outliers[k].failuresAtLastSuccess = failures
                status.set(.ejected, false, endpoint: e, now: now)
                UnsafeAtomic<Int>(at: transitions + e).wrappingIncrement(ordering: .relaxed)
                logger.info("endpoint returned from ejection", metadata: metadata(outliers[k].clusterName, outliers[k].address, ["from": "ejected", "to": "available"]))
                continue
            }
            let consecutive = failures &- outliers[k].failuresAtLastSuccess
            guard consecutive >= UInt64(detection.consecutiveFailures) else { continue }
            let members = outliers.filter { $0.cluster == outliers[k].cluster }
            let ejected = members.filter { $0.ejectedUntil > 0 }.count
            guard (ejected + 1) * 100 <= detection.maxEjectionPercent * members.count else { continue }
            // Repeat offenders stay out longer; a quiet max_ejection_time forgives.
            if outliers[k].returnedAt > 0, now - outliers[k].returnedAt > detection.maxEjectionTime.milliseconds {
                outliers[k].ejections = 0
            }
            let factor = Int64(1) << min(outliers[k].ejections, 20)
            let duration = min(detection.ejectionTime.milliseconds * factor, max(detection.maxEjectionTime.milliseconds, detection.ejectionTime.milliseconds))
            outliers[k].ejections += 1
            outliers[k].ejectedUntil = now + duration
            status.set(.ejected, true, endpoint: e, now: now)
            UnsafeAtomic<Int>(at: transitions + e).wrappingIncrement(ordering: .relaxed)
            UnsafeAtomic<Int>(at: ejectionCounts + e).wrappingIncrement(ordering: .relaxed)
            logger.info("endpoint ejected", metadata: metadata(outliers[k].clusterName, outliers[k].address, [
                "from": "available", "to": "ejected", "reason": "\(consecutive) consecutive connect failures",
                "ejection_time": "\(ConfigDuration(milliseconds: duration))",
            ]))
        }
    }
}
