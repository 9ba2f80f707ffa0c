import Atomics
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// A reload on the checker's side: the targets and outlier records for a new snapshot,
/// matched by endpoint identity to the ones running.
extension HealthChecker {
    /// Rebuilds the targets for `snapshot`, by identity: same endpoint and same check keeps
    /// its target as it is (an unhealthy endpoint stays unhealthy, thresholds carry on); a
    /// changed check starts over from the endpoint's current health; a new endpoint is
    /// checked at once. Same for outlier detection.
    func install(_ snapshot: Snapshot, now: Int64) {
        var oldTargets: [Int: Target] = [:]
        for t in targets { oldTargets[t.endpoint] = t }
        var oldOutliers: [Int: Outlier] = [:]
        for o in outliers { oldOutliers[o.endpoint] = o }
        var newTargets: [Target] = []
        var newOutliers: [Outlier] = []
        // One client context per cluster with `tls:` (kept while its settings stay).
        var contexts: [String: TLSClientContext] = [:]
        for t in targets { if let tls = t.tls { contexts[t.cluster] = tls } }
        for cluster in snapshot.clusters {
            guard let settings = cluster.config.tls, cluster.config.healthCheck?.transport == .tcp else {
                contexts[cluster.name] = nil
                continue
            }
            if contexts[cluster.name]?.settings != settings { contexts[cluster.name] = TLSClientContext(settings, sessions: sessions) }
        }
        for endpoint in snapshot.endpoints {
            let cluster = snapshot.clusters[endpoint.cluster]
            let id = endpoint.id
            if let check = cluster.config.healthCheck {
                let wantsTLS = cluster.config.tls != nil && check.transport == .tcp
                if let old = oldTargets[id], old.check == check, old.wantsTLS == wantsTLS, old.tls === contexts[cluster.name] {
                    oldTargets[id] = nil
                    newTargets.append(old)
                } else {
                    var random = FastRandom(seed: StableHash.endpoint(endpoint.address, seed: 3))
                    var target = Target(
                        endpoint: id, cluster: cluster.name, address: endpoint.address, check: check,
                        request: HealthChecker.request(check, endpoint.address), nextDue: now,
                        healthy: !status.flags(id).contains(.unhealthy), random: random)
                    target.wantsTLS = wantsTLS
                    target.tls = contexts[cluster.name]
                    if let old = oldTargets[id] {
                        // The check changed: keep the health it has, let thresholds decide.
                        old.tlsClient?.free()
                        if old.fd >= 0 { close(old.fd) }
                        oldTargets[id] = nil
                        target.checked = true
                    } else {
                        let jitter = check.initialJitter.milliseconds > 0 ? Int64(random.next(below: Int(check.initialJitter.milliseconds))) : 0
                        target.nextDue = now + jitter
                        target.random = random
                    }
                    newTargets.append(target)
                }
            } else if status.flags(id).contains(.unhealthy) {
                // No check any more: nothing says it is unhealthy.
                status.set(.unhealthy, false, endpoint: id, now: 0)
            }
            if let detection = cluster.config.outlierDetection {
                if let old = oldOutliers[id], old.detection == detection {
                    oldOutliers[id] = nil
                    newOutliers.append(old)
                } else {
                    // Changed settings start over; an ejection under the old ones ends now.
                    if let old = oldOutliers.removeValue(forKey: id), old.ejectedUntil > 0 {
                        status.set(.ejected, false, endpoint: id, now: now)
                    }
                    newOutliers.append(Outlier(
                        endpoint: id, cluster: cluster.id, clusterName: cluster.name, address: endpoint.address,
                        detection: detection, failuresAtLastSuccess: workerStats.total(.connectFailures, endpoint: id),
                        lastSuccesses: workerStats.total(.total, endpoint: id)))
                }
            }
        }
        // Removed endpoints (and endpoints whose detection was turned off) are forgotten;
        // an ejection outlier detection can no longer end is ended now.
        for old in oldTargets.values where old.fd >= 0 {
            old.tlsClient?.free()
            close(old.fd)
        }
        for old in oldOutliers.values where old.ejectedUntil > 0 { status.set(.ejected, false, endpoint: old.endpoint, now: now) }
        targets = newTargets
        outliers = newOutliers
        // Every target still waiting for its first check (new ones, and any an earlier
        // reload added that has not had it yet).
        unchecked.store(newTargets.filter { !$0.checked }.count, ordering: .releasing)
        installed.store(snapshot.generation, ordering: .releasing)
    }

    static func request(_ check: Config.HealthCheck, _ address: SocketAddress) -> [UInt8] {
        switch check.kind {
        case .tcp: return []
        case .dns(let query, let type, _): return DNSCheck.request(query: query, type: type, stream: check.transport == .tcp)
        case .sendExpect(let send, _): return send
        case .http(let path, let host, _): return HTTPCheck.request(path: path, host: host ?? address.description)
        }
    }
}
