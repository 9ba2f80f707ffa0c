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
#include <liburing.h>
#include <sys/mman.h>
#include <string.h>

// Function-like and enum-derived macros do not import into Swift; mirror them here.
static const unsigned CURing_IOSQE_IO_LINK = IOSQE_IO_LINK;
static const unsigned CURing_IOSQE_BUFFER_SELECT = IOSQE_BUFFER_SELECT;
static const unsigned CURing_IOSQE_CQE_SKIP_SUCCESS = IOSQE_CQE_SKIP_SUCCESS;
static const unsigned CURing_IORING_CQE_BUFFER_SHIFT = IORING_CQE_BUFFER_SHIFT;
// fcntl.h declares these only under _GNU_SOURCE; the values are the kernel ABI.
static const unsigned CURing_SPLICE_F_MOVE = 1;
static const unsigned CURing_SPLICE_F_NONBLOCK = 2;
static const unsigned CURing_SPLICE_F_MORE = 4;

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

#endif
