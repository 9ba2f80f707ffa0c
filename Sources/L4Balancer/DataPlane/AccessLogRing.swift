import Atomics

#if canImport(Glibc)
import Glibc
#endif

/// How a connection ended, for the access log.
enum EndReason: UInt8 {
    case clientFIN = 1, upstreamFIN, reset, error, idleTimeout, sendTimeout, drain, refused, connectFailed, unhealthy
    /// UDP: `proxy_responses` replies relayed; evicted by `max_sessions`; ICMP port
    /// unreachable from the endpoint.
    case responses, evicted, portUnreachable

    var name: String {
        switch self {
        case .clientFIN: return "client_fin"
        case .upstreamFIN: return "upstream_fin"
        case .reset: return "reset"
        case .error: return "error"
        case .idleTimeout: return "idle_timeout"
        case .sendTimeout: return "send_timeout"
        case .drain: return "drain"
        case .refused: return "refused"
        case .connectFailed: return "connect_failed"
        case .unhealthy: return "endpoint_unhealthy"
        case .responses: return "responses"
        case .evicted: return "evicted"
        case .portUnreachable: return "port_unreachable"
        }
    }
}

/// One closed (or refused) connection, as the worker hands it to the access-log writer:
/// plain values, identities rather than names (56 bytes).
struct AccessRecord {
    /// Wall-clock ms when it ended; how long it lived (ms).
    var endedAt: Int64 = 0
    var durationMilliseconds: UInt32 = 0
    var listener: UInt16 = 0
    var reason: UInt8 = 0
    var family: UInt8 = 0
    /// Endpoint identity, -1 when none was connected.
    var endpoint: Int32 = -1
    var clientPort: UInt16 = 0
    var clientIP: (UInt64, UInt64) = (0, 0)
    /// Bytes received from the client / from the upstream.
    var bytesFromClient: UInt64 = 0
    var bytesFromUpstream: UInt64 = 0
}

/// What a worker keeps per slot while the access log is on: when the connection started,
/// who the client is, bytes each way, and which side sent the first FIN.
struct AccessSlot {
    /// Monotonic ms (the worker's clock).
    var startedAt: Int64 = 0
    /// The endpoint identity of the last connect attempt (-1: none), for lines of
    /// connections that never connected.
    var lastEndpoint: Int32 = -1
    var bytesFromClient: UInt64 = 0
    var bytesFromUpstream: UInt64 = 0
    var clientIP: (UInt64, UInt64) = (0, 0)
    var clientPort: UInt16 = 0
    var family: UInt8 = 0
    /// 0: no FIN yet; else the EndReason of the side that sent it first.
    var firstFIN: UInt8 = 0
}

/// A worker's hand-off to the access-log writer: a single-producer single-consumer ring of
/// fixed-size records. The worker never waits: when the ring is full (the writer is behind,
/// or its output blocks), the record is dropped and counted.
final class AccessLogRing: @unchecked Sendable {
    /// Records per worker (a power of two); `L4LB_ACCESS_LOG_RING` sets it, for tests.
    let capacity: Int
    let records: UnsafeMutablePointer<AccessRecord>
    /// Written by the worker (next free) and by the writer (next to read).
    let head = ManagedAtomic<Int>(0)
    let tail = ManagedAtomic<Int>(0)
    /// The worker's own copy of `head`.
    private var producerHead = 0

    init() {
        let asked = getenv("L4LB_ACCESS_LOG_RING").flatMap { Int(String(cString: $0)) } ?? 16384
        var size = 64
        while size < asked, size < 1 << 22 { size *= 2 }
        capacity = size
        records = reserve(AccessRecord.self, size)
    }

    /// Producer side (the worker): false when full.
    @inline(__always)
    func push(_ record: AccessRecord) -> Bool {
        if producerHead - tail.load(ordering: .acquiring) >= capacity { return false }
        records[producerHead & (capacity - 1)] = record
        producerHead += 1
        head.store(producerHead, ordering: .releasing)
        return true
    }

    /// Consumer side (the writer): every record published so far, in order.
    func drain(_ body: (AccessRecord) -> Void) {
        let end = head.load(ordering: .acquiring)
        var next = tail.load(ordering: .relaxed)
        while next < end {
            body(records[next & (capacity - 1)])
            next += 1
        }
        tail.store(next, ordering: .releasing)
    }
}
