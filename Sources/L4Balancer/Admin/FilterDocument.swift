import BPFSteer
import Foundation

/// The filter's part of `/stats`, and `GET /blocklist`.
extension WorkerPool {
    func filterDocument() -> [String: Any] {
        let lists = filter.list()
        var document: [String: Any] = [
            // Where the lists are enforced: "xdp" on every interface, or "userspace".
            "mode": filter.userspace ? "userspace" : "xdp",
            "interfaces": filter.interfaces.map { ["name": $0.name, "mode": $0.mode.rawValue, "program_id": $0.programID] as [String: Any] },
            "blocked_entries": lists.blocked.count,
            "allowed_entries": lists.allowed.count,
            "counters": filterCounts().map { row -> [String: Any] in
                var dropped: [String: UInt64] = [:]
                var passed: [String: UInt64] = [:]
                for reason in FilterReason.allCases {
                    if reason.drops { dropped[reason.label] = row.counts[reason] ?? 0 } else { passed[reason.label] = row.counts[reason] ?? 0 }
                }
                return ["interface": row.interface, "mode": row.mode, "dropped": dropped, "passed": passed]
            },
        ]
        if let reason = filter.fallbackReason { document["fallback_reason"] = reason }
        return document
    }

    public func blocklistDocument() -> [String: Any] {
        let lists = filter.list()
        return [
            "blocked": lists.blocked.map { ["entry": $0.0.description, "origin": $0.1.names] as [String: Any] },
            "allowed": lists.allowed.map { ["entry": $0.0.description, "origin": $0.1.names] as [String: Any] },
        ]
    }
}
