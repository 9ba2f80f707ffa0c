import CURing

#if canImport(Glibc)
import Glibc
#endif

/// Why a ring could not be set up, with what an operator can do about it.
public struct RingSetupError: Error, CustomStringConvertible {
    public let errno: Errno
    public let hint: String

    public var description: String { "io_uring is unavailable: \(errno). \(hint)" }
}

/// An io_uring instance owned by one thread. Requests are built with the `prepare…` methods
/// and sent with `submit…`; completions are copied into a caller-owned buffer by `reap`.
/// All state lives behind a pointer, so the methods need no exclusive access to `self`.
public struct Ring: ~Copyable {
    @usableFromInline
    let ring: UnsafeMutablePointer<io_uring>

    public let capabilities: Capabilities

    /// Creates a ring with `entries` submission slots (the completion queue is twice that).
    /// Asks for `SINGLE_ISSUER | DEFER_TASKRUN` and falls back when the kernel refuses; the
    /// ring must then only be used from the thread that created it.
    public init(entries: UInt32) throws(RingSetupError) {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        var params = io_uring_params()
        params.cq_entries = entries * 2
        let base = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP
        params.flags = base | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        var result = io_uring_queue_init_params(entries, ring, &params)
        var singleIssuer = true
        var deferTaskrun = true
        if result == -EINVAL {
            params = io_uring_params()
            params.cq_entries = entries * 2
            params.flags = base | IORING_SETUP_COOP_TASKRUN
            result = io_uring_queue_init_params(entries, ring, &params)
            singleIssuer = false
            deferTaskrun = false
        }
        if result == -EINVAL {
            params = io_uring_params()
            params.cq_entries = entries * 2
            params.flags = base
            result = io_uring_queue_init_params(entries, ring, &params)
        }
        guard result >= 0 else {
            ring.deallocate()
            throw RingSetupError(errno: Errno(result: result), hint: Ring.setupHint(Errno(result: result)))
        }
        var caps = Capabilities(
            singleIssuer: singleIssuer, deferTaskrun: deferTaskrun,
            fastPoll: params.features & IORING_FEAT_FAST_POLL != 0,
            batchWait: deferTaskrun && params.features & CURing_FEAT_MIN_TIMEOUT != 0,
            noDrop: params.features & IORING_FEAT_NODROP != 0,
            multishotAccept: false, providedBufferRings: false, msgRing: false,
            sendZeroCopy: false, splice: false, socket: false)
        if let probe = io_uring_get_probe_ring(ring) {
            defer { io_uring_free_probe(probe) }
            func has(_ op: io_uring_op) -> Bool { io_uring_opcode_supported(probe, Int32(op.rawValue)) != 0 }
            for (op, name) in Capabilities.requiredOpcodes
            where io_uring_opcode_supported(probe, Int32(op)) == 0 {
                io_uring_queue_exit(ring)
                ring.deallocate()
                throw RingSetupError(
                    errno: .notImplemented,
                    hint: "The kernel's io_uring lacks the \(name) operation; Linux 6.1 or newer is required.")
            }
            caps.msgRing = has(IORING_OP_MSG_RING)
            caps.sendZeroCopy = has(IORING_OP_SEND_ZC)
            caps.splice = has(IORING_OP_SPLICE)
            caps.socket = has(IORING_OP_SOCKET)
            // Multishot accept and buffer rings arrived with IORING_OP_SOCKET (5.19).
            caps.multishotAccept = caps.socket
            caps.providedBufferRings = caps.socket
        }
        // Registering the ring's own fd spares every io_uring_enter a file-table lookup.
        _ = io_uring_register_ring_fd(ring)
        caps.multishotReceiveLimit = Ring.probeMultishotReceiveLimit(ring)
        self.ring = ring
        self.capabilities = caps
    }

    /// Older kernels reject a multishot receive whose `optlen` is set (`EINVAL` at prep);
    /// newer ones take it as a total limit. One byte waits on a socket pair, and the
    /// receive names a buffer group that does not exist: a kernel that knows the limit
    /// answers `ENOBUFS`. Runs before the ring is handed out, so it is the only request.
    static func probeMultishotReceiveLimit(_ ring: UnsafeMutablePointer<io_uring>) -> Bool {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { return false }
        defer {
            close(pair[0])
            close(pair[1])
        }
        var byte: UInt8 = 1
        guard write(pair[1], &byte, 1) == 1, let sqe = io_uring_get_sqe(ring) else { return false }
        io_uring_prep_recv_multishot(sqe, pair[0], nil, 0, 0)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = 0xFFFF
        sqe.pointee.file_index = 1
        sqe.pointee.user_data = 0
        guard io_uring_submit_and_wait(ring, 1) >= 0 else { return false }
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        guard io_uring_peek_cqe(ring, &cqe) == 0, let cqe else { return false }
        let result = cqe.pointee.res
        io_uring_cqe_seen(ring, cqe)
        return result != -EINVAL
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    static func setupHint(_ errno: Errno) -> String {
        var hint = ""
        if let value = readSysctl("/proc/sys/kernel/io_uring_disabled"), value != 0 {
            hint = "kernel.io_uring_disabled is \(value); set it to 0 (sysctl -w kernel.io_uring_disabled=0)."
        } else if errno == .notPermitted {
            hint = "The process may not create rings (seccomp, container policy, or io_uring_group)."
        } else if errno == .notImplemented {
            hint = "The kernel was built without io_uring."
        } else if errno == Errno(rawValue: ENOMEM) {
            hint = "Locked-memory limit too low (ulimit -l)."
        }
        return hint
    }

    /// Reads a small integer from a /proc file without Foundation.
    static func readSysctl(_ path: String) -> Int? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 32)
        let count = read(fd, &bytes, bytes.count)
        guard count > 0 else { return nil }
        return Int(String(decoding: bytes[..<count], as: UTF8.self).filter(\.isNumber))
    }

    /// The ring's file descriptor, for `msg_ring` from another ring.
    public var fileDescriptor: Int32 { ring.pointee.ring_fd }

    // MARK: Submission

    /// A free submission slot. When the queue is full, what is queued is submitted first;
    /// nil when the kernel takes none of it (its completion queue is backed up), so the
    /// caller can drop that one request and count it instead of trapping.
    @inlinable
    func nextSQE() -> UnsafeMutablePointer<io_uring_sqe>? {
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        for _ in 0..<3 {
            _ = submitPending()
            if let sqe = io_uring_get_sqe(ring) { return sqe }
        }
        return nil
    }

    /// Free submission slots.
    @inlinable
    public var submissionSpace: UInt32 { io_uring_sq_space_left(ring) }

    /// Submits queued requests without waiting. Returns how many were taken.
    @inlinable
    @discardableResult
    public func submitPending() -> Int32 {
        while true {
            let result = io_uring_submit(ring)
            if result == -EINTR { continue }
            return result
        }
    }

    /// Submits queued requests and waits for at least `minimum` completions.
    /// `EINTR` and `ETIME` are not failures: the caller reaps what there is and loops.
    @inline(never)
    public func submitAndWait(minimum: UInt32) throws(Errno) {
        try Ring.checkWait(io_uring_submit_and_wait(ring, minimum))
    }

    /// Submits, then waits for `batch` completions — but returns as soon as
    /// `windowMicroseconds` have passed with at least one ready (without one, it waits for
    /// the first, at most `timeoutMilliseconds`). The kernel wakes the thread once per
    /// window instead of once per completion. Needs `capabilities.batchWait` (6.12).
    @inline(never)
    public func submitAndWait(batch: UInt32, windowMicroseconds: UInt32, timeoutMilliseconds: UInt32) throws(Errno) {
        try Ring.checkWait(CURing_submit_and_wait_min_timeout(ring, batch, windowMicroseconds, timeoutMilliseconds))
    }

    /// A wait that ended on a signal, a timeout or a busy queue is not a failure.
    private static func checkWait(_ result: Int32) throws(Errno) {
        if result < 0, result != -EINTR, result != -ETIME, result != -EAGAIN, result != -EBUSY {
            throw Errno(result: result)
        }
    }

    // MARK: Completion

    /// Copies up to `buffer.count` ready completions into `buffer` and releases their queue
    /// slots. Allocates nothing.
    @inlinable
    public func reap(into buffer: UnsafeMutableBufferPointer<Completion>) -> Int {
        var count = 0
        let cq = ring.pointee.cq
        var head = cq.khead.pointee
        let tail = CURing_cq_tail_acquire(ring)
        let mask = cq.ring_mask
        while head != tail, count < buffer.count {
            let cqe = cq.cqes.advanced(by: Int(head & mask))
            buffer[count] = Completion(userData: cqe.pointee.user_data, result: cqe.pointee.res, flags: cqe.pointee.flags)
            count += 1
            head &+= 1
        }
        if count > 0 { io_uring_cq_advance(ring, UInt32(count)) }
        return count
    }
}

