import URing

#if canImport(Glibc)
import Glibc
#endif

/// The worker's side of the access log: bookkeeping per slot while a connection lives,
/// and one fixed-size record per closed or refused connection handed to the writer's ring
/// (never a wait, never a format or a write on the data path). Called only when it is on.
extension Worker {
    /// Wall-clock milliseconds (the coarse clock).
    static func wallMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    /// The end reason an error result says.
    static func reason(_ result: Int32) -> EndReason {
        let error = Errno(result: result)
        return error == .connectionReset || error == .brokenPipe ? .reset : .error
    }

    /// The client's address, into `ip` / `port` / `family`.
    static func peer(_ fd: Int32, ip: inout (UInt64, UInt64), port: inout UInt16, family: inout UInt8) {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) == 0 } }
        guard ok else { return }
        withUnsafeBytes(of: &storage) { peer(address: $0.baseAddress!, ip: &ip, port: &port, family: &family) }
    }

    /// A `sockaddr_in` / `sockaddr_in6` into `ip` / `port` / `family`.
    static func peer(address raw: UnsafeRawPointer, ip: inout (UInt64, UInt64), port: inout UInt16, family: inout UInt8) {
        let kind = raw.load(as: sa_family_t.self)
        if kind == sa_family_t(AF_INET) {
            family = 4
            port = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            ip = (UInt64(raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)), 0)
        } else if kind == sa_family_t(AF_INET6) {
            family = 6
            port = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            ip = (raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        }
    }

    /// One record per ended UDP session (or per-packet exchange).
    @inline(never)
    func logSessionEnded(_ slot: UInt32, reason: EndReason) {
        guard let accessLog else { return }
        var session = datagrams.sessions[slot]
        var record = AccessRecord()
        record.endedAt = Worker.wallMilliseconds()
        record.durationMilliseconds = UInt32(clamping: max(0, clock.milliseconds - session.startedAt))
        record.listener = session.listener
        record.reason = reason.rawValue
        record.endpoint = session.endpoint
        withUnsafeBytes(of: &session.client) { Worker.peer(address: $0.baseAddress!, ip: &record.clientIP, port: &record.clientPort, family: &record.family) }
        record.bytesFromClient = session.bytesFromClient
        record.bytesFromUpstream = session.bytesFromUpstream
        if !accessLog.push(record) { stats.add(.accessLogDrops) }
    }

    func noteAccepted(_ slot: UInt32, client fd: Int32) {
        var entry = AccessSlot()
        entry.startedAt = clock.milliseconds
        Worker.peer(fd, ip: &entry.clientIP, port: &entry.clientPort, family: &entry.family)
        side.access.unsafelyUnwrapped[Int(slot)] = entry
    }

    /// Closes a client refused at accept (limits, draining, no slot), counted and logged.
    func refuse(_ fd: Int32, listener: Int) {
        if let accessLog {
            var record = AccessRecord()
            record.endedAt = Worker.wallMilliseconds()
            record.listener = UInt16(listener)
            record.reason = EndReason.refused.rawValue
            Worker.peer(fd, ip: &record.clientIP, port: &record.clientPort, family: &record.family)
            if !accessLog.push(record) { stats.add(.accessLogDrops) }
        }
        Glibc.close(fd)
        stats.add(.refused, listener: listener)
    }

    @inline(never)
    func logClosed(_ slot: UInt32, _ connection: UnsafeMutablePointer<Connection>, reason: EndReason?) {
        guard let accessLog, let slots = side.access else { return }
        let entry = slots[Int(slot)]
        var record = AccessRecord()
        record.endedAt = Worker.wallMilliseconds()
        record.durationMilliseconds = UInt32(clamping: max(0, clock.milliseconds - entry.startedAt))
        record.listener = connection.pointee.listener
        record.reason = reason?.rawValue ?? (entry.firstFIN != 0 ? entry.firstFIN : EndReason.error.rawValue)
        record.endpoint = connection.pointee.endpoint >= 0 ? connection.pointee.endpoint : entry.lastEndpoint
        record.family = entry.family
        record.clientIP = entry.clientIP
        record.clientPort = entry.clientPort
        record.bytesFromClient = entry.bytesFromClient
        record.bytesFromUpstream = entry.bytesFromUpstream
        if !accessLog.push(record) { stats.add(.accessLogDrops) }
    }
}
