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
    public func prepareMultishotAccept(listener fd: Int32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_multishot_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        sqe.pointee.user_data = userData
    }

    /// One accept.
    @inlinable
    public func prepareAccept(listener fd: Int32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        sqe.pointee.user_data = userData
    }

    /// Connect `fd` to `address`; when `timeout` is given, a linked timeout cancels the
    /// connect after it (the connect then completes with `ECANCELED`). The timeout's own
    /// completion carries `timeoutUserData`.
    @inlinable
    public func prepareConnect(
        socket fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, userData: UInt64,
        timeout: UnsafePointer<Timeout>?, timeoutUserData: UInt64
    ) {
        if timeout != nil, submissionSpace < 2 { submitPending() }
        let sqe = nextSQE()
        io_uring_prep_connect(sqe, fd, address, length)
        sqe.pointee.user_data = userData
        guard let timeout else { return }
        sqe.pointee.flags |= UInt8(CURing_IOSQE_IO_LINK)
        let link = nextSQE()
        io_uring_prep_link_timeout(link, UnsafeMutableRawPointer(mutating: timeout).assumingMemoryBound(to: __kernel_timespec.self), 0)
        link.pointee.user_data = timeoutUserData
    }

    /// Receive into a buffer the kernel picks from provided-buffer group `group` when data
    /// arrives; the completion's `bufferID` names it. A connection with nothing to read
    /// holds no buffer.
    @inlinable
    public func prepareReceive(socket fd: Int32, bufferGroup group: UInt16, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_recv(sqe, fd, nil, 0, 0)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
    }

    /// Multishot receive from a provided-buffer group: completions keep coming while
    /// `hasMore` is set; `ENOBUFS` ends it when the group runs dry.
    @inlinable
    public func prepareMultishotReceive(socket fd: Int32, bufferGroup group: UInt16, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_recv_multishot(sqe, fd, nil, 0, 0)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
    }

    /// Receive into a caller-owned buffer.
    @inlinable
    public func prepareReceive(socket fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_recv(sqe, fd, buffer, length, 0)
        sqe.pointee.user_data = userData
    }

    /// Send `length` bytes; never raises `SIGPIPE`.
    @inlinable
    public func prepareSend(socket fd: Int32, bytes: UnsafeRawPointer, length: Int, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_send(sqe, fd, bytes, length, Int32(MSG_NOSIGNAL))
        sqe.pointee.user_data = userData
    }

    /// Zero-copy send: a first completion with the result, then a notification completion
    /// (`isNotification`) once the buffer may be reused.
    @inlinable
    public func prepareSendZeroCopy(socket fd: Int32, bytes: UnsafeRawPointer, length: Int, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_send_zc(sqe, fd, bytes, length, Int32(MSG_NOSIGNAL), 0)
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func prepareSendMessage(socket fd: Int32, message: UnsafePointer<msghdr>, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_sendmsg(sqe, fd, message, UInt32(MSG_NOSIGNAL))
        sqe.pointee.user_data = userData
    }

    /// Multishot recvmsg into provided buffers; `message` describes the name/control sizes
    /// (see `io_uring_recvmsg_out`).
    @inlinable
    public func prepareMultishotReceiveMessage(
        socket fd: Int32, message: UnsafeMutablePointer<msghdr>, bufferGroup group: UInt16, userData: UInt64
    ) {
        let sqe = nextSQE()
        io_uring_prep_recvmsg_multishot(sqe, fd, message, 0)
        sqe.pointee.flags |= UInt8(CURing_IOSQE_BUFFER_SELECT)
        sqe.pointee.buf_group = group
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func prepareSplice(
        from input: Int32, to output: Int32, length: UInt32, moreComing: Bool, userData: UInt64
    ) {
        let sqe = nextSQE()
        var flags = CURing_SPLICE_F_MOVE | CURing_SPLICE_F_NONBLOCK
        if moreComing { flags |= CURing_SPLICE_F_MORE }
        io_uring_prep_splice(sqe, input, -1, output, -1, length, flags)
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func prepareShutdown(socket fd: Int32, how: Int32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_shutdown(sqe, fd, how)
        sqe.pointee.user_data = userData
    }

    @inlinable
    public func prepareClose(fd: Int32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_close(sqe, fd)
        sqe.pointee.user_data = userData
    }

    /// Read, e.g. an eventfd into an 8-byte counter.
    @inlinable
    public func prepareRead(fd: Int32, into buffer: UnsafeMutableRawPointer, length: UInt32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_read(sqe, fd, buffer, length, 0)
        sqe.pointee.user_data = userData
    }

    /// A timer: completes with `ETIME` after `timeout`.
    @inlinable
    public func prepareTimeout(_ timeout: UnsafePointer<Timeout>, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_timeout(sqe, UnsafeMutableRawPointer(mutating: timeout).assumingMemoryBound(to: __kernel_timespec.self), 0, 0)
        sqe.pointee.user_data = userData
    }

    /// Cancels the request tagged `target`.
    @inlinable
    public func prepareCancel(target: UInt64, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_cancel64(sqe, target, 0)
        sqe.pointee.user_data = userData
    }

    /// Cancels every request on `fd`.
    @inlinable
    public func prepareCancelAll(fd: Int32, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_cancel_fd(sqe, fd, UInt32(IORING_ASYNC_CANCEL_ALL))
        sqe.pointee.user_data = userData
    }

    /// Posts a completion with `userData = value` and `result = length` on another ring.
    @inlinable
    public func prepareMessage(ring targetFD: Int32, result: UInt32, value: UInt64, userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_msg_ring(sqe, targetFD, result, value, 0)
        sqe.pointee.user_data = userData
    }

    /// A no-op whose only effect is a completion.
    @inlinable
    public func prepareNop(userData: UInt64) {
        let sqe = nextSQE()
        io_uring_prep_nop(sqe)
        sqe.pointee.user_data = userData
    }
}
