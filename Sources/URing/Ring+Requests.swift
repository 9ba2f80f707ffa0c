import CURing

#if canImport(Glibc)
import Glibc
#endif

/// Request builders. Each queues one request tagged with `userData`; nothing reaches the
/// kernel until the next submit. Pointers passed in must stay valid until then (buffers of
/// sends and receives until the request completes).
extension Ring {
    /// Multishot accept: one completion per accepted connection while `hasMore` is set.
    @inlinable
    @discardableResult
    public func prepareMultishotAccept(listener fd: Int32, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_multishot_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        sqe.pointee.user_data = userData
        return true
    }

    /// Connect `fd` to `address`; when `timeout` is given, a linked timeout cancels the
    /// connect after it (the connect then completes with `ECANCELED`). The timeout's own
    /// completion carries `timeoutUserData`.
    @inlinable
    @discardableResult
    public func prepareConnect(
        socket fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64,
        timeout: UnsafePointer<Timeout>?, timeoutUserData: UInt64
    ) -> Bool {
        // A connect and its linked timeout must go in the same submission.
        if timeout != nil, submissionSpace < 2 {
            submitPending()
            guard submissionSpace >= 2 else { return false }
        }
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_connect(sqe, fd, address, length)
        sqe.pointee.user_data = userData
        guard let timeout else { return true }
        sqe.pointee.flags |= UInt8(CURing_IOSQE_IO_LINK)
        guard let link = nextSQE() else {
            // The connect is queued already: it simply runs without its timeout.
            sqe.pointee.flags &= ~UInt8(CURing_IOSQE_IO_LINK)
            return true
        }
        io_uring_prep_link_timeout(link, UnsafeMutableRawPointer(mutating: timeout).assumingMemoryBound(to: __kernel_timespec.self), 0)
        link.pointee.user_data = timeoutUserData
        return true
    }

    /// Receive into a buffer the kernel picks from provided-buffer group `group` when data
    /// arrives; the completion's `bufferID` names it. A connection with nothing to read
    /// holds no buffer.
    @inlinable
    @discardableResult
    public func prepareReceive(socket fd: Int32, bufferGroup group: UInt16, flags: Int32 = 0, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_recv(sqe, fd, nil, 0, flags)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
        return true
    }

    /// Multishot receive from a provided-buffer group: completions keep coming while
    /// `hasMore` is set; `ENOBUFS` ends it when the group runs dry. With `limit` (bytes,
    /// needs `capabilities.multishotReceiveLimit`) it ends once that many have arrived:
    /// the completion that reaches the limit comes without `hasMore`, so one arm takes
    /// less than `limit` plus one buffer.
    @inlinable
    @discardableResult
    public func prepareMultishotReceive(socket fd: Int32, bufferGroup group: UInt16, limit: UInt32 = 0, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_recv_multishot(sqe, fd, nil, 0, 0)
        // `optlen` (Linux 6.16's total limit) shares its place with `file_index`.
        sqe.pointee.file_index = limit
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
        return true
    }

    /// A one-shot poll for `events` (POLLIN, …) on `fd`; the completion's result is the
    /// events that fired. For sockets, POLLIN honours `SO_RCVLOWAT`.
    @inlinable
    @discardableResult
    public func preparePoll(fd: Int32, events: UInt32, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_poll_add(sqe, fd, events)
        sqe.pointee.user_data = userData
        return true
    }

    /// Receive into a caller-owned buffer.
    @inlinable
    @discardableResult
    public func prepareReceive(socket fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_recv(sqe, fd, buffer, length, 0)
        sqe.pointee.user_data = userData
        return true
    }

    /// Send `length` bytes; never raises `SIGPIPE`.
    @inlinable
    @discardableResult
    public func prepareSend(socket fd: Int32, bytes: UnsafeRawPointer, length: Int, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_send(sqe, fd, bytes, length, Int32(MSG_NOSIGNAL))
        sqe.pointee.user_data = userData
        return true
    }

    @inlinable
    @discardableResult
    public func prepareSendMessage(socket fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_sendmsg(sqe, fd, message, UInt32(MSG_NOSIGNAL))
        sqe.pointee.user_data = userData
        return true
    }

    /// Multishot recvmsg into provided buffers; `message` describes the name/control sizes
    /// (see `io_uring_recvmsg_out`).
    @inlinable
    @discardableResult
    public func prepareMultishotReceiveMessage(
        socket fd: Int32, message: UnsafeMutablePointer<msghdr>, bufferGroup group: UInt16, userData: UInt64
    ) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_recvmsg_multishot(sqe, fd, message, 0)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
        return true
    }

    /// Read, e.g. an eventfd into an 8-byte counter.
    @inlinable
    @discardableResult
    public func prepareRead(fd: Int32, into buffer: UnsafeMutableRawPointer, length: UInt32, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_read(sqe, fd, buffer, length, 0)
        sqe.pointee.user_data = userData
        return true
    }

    /// A timer: completes with `ETIME` after `timeout`.
    @inlinable
    @discardableResult
    public func prepareTimeout(_ timeout: UnsafePointer<Timeout>, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_timeout(sqe, UnsafeMutableRawPointer(mutating: timeout).assumingMemoryBound(to: __kernel_timespec.self), 0, 0)
        sqe.pointee.user_data = userData
        return true
    }

    /// Cancels the request tagged `target`.
    @inlinable
    @discardableResult
    public func prepareCancel(target: UInt64, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_cancel64(sqe, target, 0)
        sqe.pointee.user_data = userData
        return true
    }

    /// Cancels every request on `fd`.
    @inlinable
    @discardableResult
    public func prepareCancelAll(fd: Int32, userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_cancel_fd(sqe, fd, UInt32(IORING_ASYNC_CANCEL_ALL))
        sqe.pointee.user_data = userData
        return true
    }

    /// A no-op whose only effect is a completion.
    @inlinable
    @discardableResult
    public func prepareNop(userData: UInt64) -> Bool {
        guard let sqe = nextSQE() else { return false }
        io_uring_prep_nop(sqe)
        sqe.pointee.user_data = userData
        return true
    }
}
