#ifndef CURING_SHIM_H
#define CURING_SHIM_H

// No _GNU_SOURCE here, unlike the usual shim: liburing.h defines it itself, and glibc
// headers parsed with it (fd_set's fds_bits) differ from the same headers in Swift's
// Glibc module (__fds_bits), which the importer rejects. Including glibc's headers first,
// with the default feature macros Swift's Glibc uses, keeps both definitions identical;
// liburing needs nothing that _GNU_SOURCE adds on glibc.
#include <features.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sched.h>
#include <signal.h>
#include <errno.h>
// The kernel's io_uring header before liburing's own copy of it (same include guard, so
// the copy is skipped): swift-system's CSystem module includes the kernel's, and the
// importer rejects two modules defining io_uring_sqe differently. liburing 2.3's inline
// functions build against the newer header unchanged (the ABI only ever grows).
#include <linux/io_uring.h>
#include <liburing.h>
#include <sys/mman.h>
#include <string.h>

// Function-like and enum-derived macros do not import into Swift; mirror them here.
static const unsigned CURing_IOSQE_IO_LINK = IOSQE_IO_LINK;
static const unsigned CURing_IOSQE_BUFFER_SELECT = IOSQE_BUFFER_SELECT;
static const unsigned CURing_IOSQE_CQE_SKIP_SUCCESS = IOSQE_CQE_SKIP_SUCCESS;
static const unsigned CURing_IORING_CQE_BUFFER_SHIFT = IORING_CQE_BUFFER_SHIFT;

/// Maps and registers a provided-buffer ring (liburing 2.4's io_uring_setup_buf_ring,
/// which Debian 12's liburing 2.3 lacks). Returns NULL and sets *err to a positive errno.
static inline struct io_uring_buf_ring *CURing_setup_buf_ring(struct io_uring *ring,
                                                              unsigned entries,
                                                              unsigned short bgid,
                                                              int *err) {
    size_t size = (size_t)entries * sizeof(struct io_uring_buf);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    struct io_uring_buf_ring *br = (struct io_uring_buf_ring *)mem;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = entries;
    reg.bgid = bgid;
    int ret = io_uring_register_buf_ring(ring, &reg, 0);
    if (ret < 0) {
        munmap(mem, size);
        *err = -ret;
        return NULL;
    }
    io_uring_buf_ring_init(br);
    *err = 0;
    return br;
}

static inline void CURing_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br,
                                        unsigned entries, unsigned short bgid) {
    io_uring_unregister_buf_ring(ring, bgid);
    munmap(br, (size_t)entries * sizeof(struct io_uring_buf));
}

/// The completion queue's tail, loaded with acquire ordering (a macro in liburing).
static inline unsigned CURing_cq_tail_acquire(const struct io_uring *ring) {
    return io_uring_smp_load_acquire(ring->cq.ktail);
}

/// Whether completions wait in the kernel's overflow list or need task work to run.
static inline int CURing_cq_needs_enter(const struct io_uring *ring) {
    unsigned flags = IO_URING_READ_ONCE(*ring->sq.kflags);
    return (flags & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN)) != 0;
}

/// IORING_FEAT_MIN_TIMEOUT (Linux 6.12): io_uring_getevents_arg's `pad` became
/// `min_wait_usec`. liburing 2.3 knows neither.
static const unsigned CURing_FEAT_MIN_TIMEOUT = 1U << 15;

/// Submits what is queued, then waits for `wait_nr` completions — but once
/// `min_wait_usec` has passed and at least one completion is ready, returns with what is
/// there; with none, it waits for the first one (up to `timeout_ms`). With DEFER_TASKRUN
/// the kernel does not wake the thread for each completion inside that window, so a busy
/// ring is woken once per batch rather than once per packet. This is liburing 2.8's
/// io_uring_submit_and_wait_min_timeout, written against 2.3's struct io_uring: the SQ
/// flush mirrors its __io_uring_flush_sq, and int_flags bit 0 is its INT_FLAG_REG_RING.
static inline int CURing_submit_and_wait_min_timeout(struct io_uring *ring, unsigned wait_nr,
                                                     unsigned min_wait_usec, unsigned timeout_ms) {
    struct io_uring_sq *sq = &ring->sq;
    unsigned tail = sq->sqe_tail;
    if (sq->sqe_head != tail) {
        sq->sqe_head = tail;
        io_uring_smp_store_release(sq->ktail, tail);
    }
    unsigned submit = tail - *sq->khead;
    struct __kernel_timespec ts;
    ts.tv_sec = timeout_ms / 1000;
    ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000;
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof(arg));
    arg.pad = min_wait_usec;
    arg.ts = (unsigned long long)(uintptr_t)&ts;
    unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
    int fd = ring->ring_fd;
    if (ring->int_flags & 1) {
        flags |= IORING_ENTER_REGISTERED_RING;
        fd = ring->enter_ring_fd;
    }
    // Returns -errno, like every liburing syscall wrapper.
    return io_uring_enter2(fd, submit, wait_nr, flags, (sigset_t *)&arg, sizeof(arg));
}

#endif
