import URing

#if canImport(Glibc)
import Glibc
#endif

/// Opens listening sockets. Every worker gets its own socket per listener, bound to the
/// same address with `SO_REUSEPORT`, so the kernel spreads connections across workers.
enum ListenerSocket {
    struct OpenError: Error, CustomStringConvertible {
        let listener: String
        let address: SocketAddress
        let step: String
        let errno: Errno

        var description: String { "listener \(listener) (\(address)): \(step) failed: \(errno)" }
    }

    static func open(name: String, address: SocketAddress, transport: Config.Listener.TransportProtocol = .tcp,
                     backlog: Int32 = 4096) throws(OpenError) -> Int32 {
        let domain = address.family == .inet ? AF_INET : AF_INET6
        let type = transport == .udp ? SOCK_DGRAM.rawValue : SOCK_STREAM.rawValue
        let fd = socket(domain, Int32(type) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw OpenError(listener: name, address: address, step: "socket", errno: .current) }
        var one: Int32 = 1
        let size = socklen_t(MemoryLayout<Int32>.size)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, size)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, size)
        if transport == .tcp {
            // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per connection.
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, size)
        } else {
            // Room for bursts of datagrams between two passes of the worker's loop; past
            // net.core.rmem_max where l4lb may (CAP_NET_ADMIN).
            var buffer: Int32 = 4 << 20
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buffer, size) != 0 { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer, size) }
            // Bound to 0.0.0.0 or [::]: learn each datagram's destination, so replies
            // leave from the address the client sent to.
            if address.ip.allSatisfy({ $0 == 0 }) {
                if address.family == .inet {
                    setsockopt(fd, Int32(IPPROTO_IP), IP_PKTINFO, &one, size)
                } else {
                    setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_RECVPKTINFO, &one, size)
                }
            }
        }
        if address.family == .inet6 {
            // [::]:port serves IPv6 only, so 0.0.0.0:port can be a listener of its own.
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, size)
        }
        var storage = sockaddr_storage()
        let length = address.write(to: &storage)
        let bound = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            let error = Errno.current
            Glibc.close(fd)
            throw OpenError(listener: name, address: address, step: "bind", errno: error)
        }
        guard transport == .udp || listen(fd, backlog) == 0 else {
            let error = Errno.current
            Glibc.close(fd)
            throw OpenError(listener: name, address: address, step: "listen", errno: error)
        }
        return fd
    }

    /// Datagrams the kernel dropped at this socket because its receive queue was full
    /// (SK_MEMINFO_DROPS).
    static func receiveQueueDrops(_ fd: Int32) -> UInt64 {
        var info = [UInt32](repeating: 0, count: 9)
        var length = socklen_t(info.count * 4)
        guard getsockopt(fd, SOL_SOCKET, SO_MEMINFO, &info, &length) == 0, length >= 36 else { return 0 }
        return UInt64(info[8])
    }
}

extension WorkerPool {
    /// The kernel's receive-queue drops over every worker's socket of a UDP listener.
    func receiveQueueDrops(listener id: Int) -> UInt64 {
        let snapshot = store.snapshot
        guard let position = snapshot.listeners.firstIndex(where: { $0.id == id }) else { return 0 }
        return snapshot.listenerSockets.reduce(0) { sum, sockets in
            position < sockets.count && sockets[position] >= 0 ? sum + ListenerSocket.receiveQueueDrops(sockets[position]) : sum
        }
    }
}

/// The listening sockets of a whole config: one per listener per worker.
enum ListenerSockets {
    struct OpenError: Error, CustomStringConvertible {
        let index: Int
        let error: ListenerSocket.OpenError
        var description: String { "listeners[\(index)].address: \(error)" }
    }

    /// Per worker, per listener: a socket. Listeners `previous` already serves at the same
    /// address keep their sockets (so nothing in their accept queues is lost); the others
    /// get new ones. On an error every socket opened here is closed again.
    static func open(_ listeners: [Config.Listener], workers: Int, reusing previous: Snapshot?) throws(OpenError) -> [[Int32]] {
        var opened: [Int32] = []
        var sockets = Array(repeating: [Int32](), count: workers)
        for (i, listener) in listeners.enumerated() {
            let kept = previous.flatMap { snapshot in
                snapshot.listeners.firstIndex { $0.name == listener.name && $0.address == listener.address && $0.transport == listener.transport }
            }
            for worker in 0..<workers {
                if let kept, let old = previous?.listenerSockets[worker][kept] {
                    sockets[worker].append(old)
                    continue
                }
                do {
                    let fd = try ListenerSocket.open(name: listener.name, address: listener.address, transport: listener.transport)
                    opened.append(fd)
                    sockets[worker].append(fd)
                } catch {
                    for fd in opened { close(fd) }
                    throw OpenError(index: i, error: error)
                }
            }
        }
        return sockets
    }
}
